"""Names imported by the reference package; the encoder benchmark never calls them."""


def resize(*args, **kwargs):
    raise NotImplementedError("torchvision stand-in: resize is not needed by the encoder benchmark")


def to_pil_image(*args, **kwargs):
    raise NotImplementedError(
        "torchvision stand-in: to_pil_image is not needed by the encoder benchmark"
    )
