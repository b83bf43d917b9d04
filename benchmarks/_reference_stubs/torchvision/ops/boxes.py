"""Names imported by the reference automatic mask generator; the benchmark never calls them."""


def box_area(boxes):
    """Area of (N, 4) xyxy boxes."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def batched_nms(*args, **kwargs):
    raise NotImplementedError(
        "torchvision stand-in: batched_nms is not needed by the encoder benchmark"
    )
