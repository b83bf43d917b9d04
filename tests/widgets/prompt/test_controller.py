"""PromptController without a GUI: a bare ViewerModel and the fast FakeModel.

FakeModel masks are disks of radius RADIUS px around positive points (filled boxes, minus
negative disks), so these tests check *where* objects land after the world → plane mapping.
"""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_esam.widgets.prompt.controller import (
    KEYS,
    NEGATIVE,
    POSITIVE,
    EmbeddingCache,
    PromptController,
    plane_of,
)
from tests.fakes import (
    RADIUS,
    Factory,
    FakeModel,
    add_box,
    add_point,
    blobs,
    centre,
    model_input,
)


def make(image=None, **image_kwargs):
    viewer = ViewerModel()
    factory = Factory()
    ctrl = PromptController(viewer, model_factory=factory, notify=False)
    layer = None
    if image is not None:
        layer = viewer.add_image(image, **image_kwargs)
        ctrl.image_layer = layer
        ctrl.ensure_prompt_layers()
    return viewer, ctrl, factory, layer








# ------------------------------------------------------------------------ basics


def test_positive_point_gives_preview_at_the_click():
    viewer, ctrl, factory, _ = make(blobs())
    add_point(ctrl, (40, 70))
    mask = ctrl.preview_mask()
    assert mask is not None and mask.any()
    r, c = centre(mask > 0)
    assert abs(r - 40) < 1.5 and abs(c - 70) < 1.5
    area = (mask > 0).sum()
    assert abs(area - np.pi * RADIUS**2) / (np.pi * RADIUS**2) < 0.2  # best score = radius 1x
    assert factory.calls == [("mobilesam", None, "auto")]
    assert "Preview: 1 object" in ctrl.status


def test_commit_gives_label_1_then_label_2_and_keeps_label_1():
    viewer, ctrl, _, _ = make(blobs())
    add_point(ctrl, (40, 40))
    assert ctrl.commit() == [1]
    labels = ctrl.labels_layer
    assert labels is not None and labels.data.shape == (120, 160)
    first = labels.data == 1
    assert first.any() and abs(centre(first)[0] - 40) < 1.5
    # prompts and preview were cleared for the next object
    assert len(ctrl.points_layer.data) == 0 and not np.any(ctrl.preview_layer.data)
    add_point(ctrl, (80, 120))
    assert ctrl.commit() == [2]
    np.testing.assert_array_equal(labels.data == 1, first)
    r, c = centre(labels.data == 2)
    assert abs(r - 80) < 1.5 and abs(c - 120) < 1.5
    assert set(np.unique(labels.data)) == {0, 1, 2}
    # layer stack: preview and labels stay below the prompt layers, points stay active
    names = [lyr.name for lyr in viewer.layers]
    assert names.index("ESAM labels") < names.index("ESAM boxes")
    assert viewer.layers.selection.active is ctrl.points_layer


def test_negative_point_removes_area():
    _, ctrl, _, _ = make(blobs())
    add_point(ctrl, (60, 80))
    before = (ctrl.preview_mask() > 0).sum()
    add_point(ctrl, (60, 92), NEGATIVE)
    after = ctrl.preview_mask() > 0
    assert 0 < after.sum() < before
    assert not after[60, 92]
    assert list(ctrl.points_layer.features["label"]) == [POSITIVE, NEGATIVE]


def test_box_gives_an_object():
    _, ctrl, _, _ = make(blobs())
    add_box(ctrl, (20, 30), (60, 90))
    mask = ctrl.preview_mask() > 0
    rows, cols = np.nonzero(mask)
    assert abs(rows.min() - 20) <= 2 and abs(rows.max() - 60) <= 2
    assert abs(cols.min() - 30) <= 2 and abs(cols.max() - 90) <= 2
    assert ctrl.commit() == [1]


def test_two_boxes_give_two_labels_in_one_decoder_call():
    _, ctrl, factory, _ = make(blobs())
    add_box(ctrl, (10, 10), (40, 50))  # builds the engine and decodes once
    calls = factory.model.decode_calls
    add_box(ctrl, (70, 90), (110, 150))
    assert factory.model.decode_calls == calls + 1
    preview = ctrl.preview_mask()
    assert set(np.unique(preview)) == {0, 1, 2}
    assert ctrl.commit() == [1, 2]
    data = ctrl.labels_layer.data
    assert data[25, 30] == 1 and data[90, 120] == 2
    assert len(ctrl.labels_layer._undo_history) == 1  # one commit = one undo step


def test_points_with_one_box_make_one_object():
    _, ctrl, _, _ = make(blobs())
    add_box(ctrl, (20, 20), (50, 50))
    add_point(ctrl, (35, 35))
    assert set(np.unique(ctrl.preview_mask())) == {0, 1}


def test_points_with_two_boxes_is_an_error_message_not_a_guess():
    _, ctrl, _, _ = make(blobs())
    add_box(ctrl, (20, 20), (50, 50))
    add_box(ctrl, (70, 70), (100, 100))
    add_point(ctrl, (35, 35))
    assert "2 boxes" in ctrl.status
    assert not np.any(ctrl.preview_layer.data)
    assert ctrl.commit() == []


def test_only_negative_points_ask_for_a_positive_one():
    _, ctrl, _, _ = make(blobs())
    add_point(ctrl, (35, 35), NEGATIVE)
    assert "positive point" in ctrl.status
    assert ctrl.preview_mask() is None


def test_multimask_cycles_through_three_candidates():
    _, ctrl, _, _ = make(blobs())
    add_point(ctrl, (60, 80))
    areas = []
    for _ in range(3):
        areas.append(int((ctrl.preview_mask() > 0).sum()))
        ctrl.next_mask()
    # FakeModel scores 0.5 / 0.9 / 0.7 for radii 0.5 / 1 / 1.5 x RADIUS: best first
    assert areas[0] < areas[1] and areas[2] < areas[0]
    assert (ctrl.preview_mask() > 0).sum() == areas[0]  # wrapped around
    ctrl.next_mask()
    assert ctrl.commit() == [1]
    assert (ctrl.labels_layer.data == 1).sum() == areas[1]  # commits the shown candidate


def test_an_update_without_changes_keeps_the_painted_preview():
    viewer, ctrl, _, _ = make(blobs())
    add_point(ctrl, (60, 80))
    layer = ctrl.preview_layer
    data = layer.data
    painted: list = []
    layer.events.data.connect(painted.append)
    ctrl.update()  # a second prompt event with the same prompts: nothing to repaint
    assert layer.data is data and not painted
    ctrl.next_mask()  # another candidate: painted again
    assert painted and layer.data is not data
    viewer.layers.remove(layer)  # the user deletes the preview: the next update shows it anew
    ctrl.update()
    assert ctrl.preview_layer in viewer.layers and (ctrl.preview_mask() > 0).any()


# --------------------------------------------------------------------- geometry


def test_scale_and_translate_map_clicks():
    _, ctrl, _, _ = make(blobs(), scale=(2, 2), translate=(10, 5))
    add_point(ctrl, (10 + 2 * 30, 5 + 2 * 50))  # world → data (30, 50)
    r, c = centre(ctrl.preview_mask() > 0)
    assert abs(r - 30) < 1.5 and abs(c - 50) < 1.5
    ctrl.commit()
    labels = ctrl.labels_layer
    np.testing.assert_allclose(labels.scale, (2, 2))
    np.testing.assert_allclose(labels.translate, (10, 5))
    assert labels.data[30, 50] == 1


def test_prompt_layer_with_other_transform_maps_through_world():
    viewer, ctrl, _, image = make(blobs(), scale=(2, 2), translate=(10, 5))
    # a user points layer in plain world units (scale 1)
    pts = viewer.add_points(np.array([[10 + 2 * 70, 5 + 2 * 20]]), name="my clicks")
    ctrl.points_layer = pts
    r, c = centre(ctrl.preview_mask() > 0)
    assert abs(r - 70) < 1.5 and abs(c - 20) < 1.5


def test_3d_stack_commits_only_in_current_slice():
    stack = np.stack([blobs(seed=s) for s in range(5)])
    viewer, ctrl, factory, _ = make(stack)
    viewer.dims.set_current_step(0, 3)
    add_point(ctrl, (3, 50, 60))
    assert factory.embedded[-1].shape == (120, 160, 3)
    np.testing.assert_array_equal(factory.embedded[-1], model_input(stack[3]))
    assert ctrl.commit() == [1]
    data = ctrl.labels_layer.data
    assert data.shape == stack.shape
    assert data[3, 50, 60] == 1
    assert not data[[0, 1, 2, 4]].any()


def test_prompts_on_other_slices_are_ignored():
    stack = np.stack([blobs(seed=s) for s in range(3)])
    viewer, ctrl, _, _ = make(stack)
    viewer.dims.set_current_step(0, 0)
    add_point(ctrl, (0, 30, 30))
    viewer.dims.set_current_step(0, 2)
    assert ctrl.preview_mask() is None  # the point lives on slice 0
    add_point(ctrl, (2, 80, 80))
    r, c = centre(ctrl.preview_mask() > 0)
    assert abs(r - 80) < 1.5 and abs(c - 80) < 1.5


def test_slice_scale_translate_in_3d():
    stack = np.stack([blobs(seed=s) for s in range(4)])
    viewer, ctrl, factory, _ = make(stack, scale=(3, 2, 2), translate=(1, 10, 5))
    viewer.dims.set_current_step(0, 2)
    add_point(ctrl, (1 + 3 * 2, 10 + 2 * 40, 5 + 2 * 30))
    np.testing.assert_array_equal(factory.embedded[-1], model_input(stack[2]))
    ctrl.commit()
    data = ctrl.labels_layer.data
    assert data[2, 40, 30] == 1 and not data[[0, 1, 3]].any()
    # the preview layer only covers the current slice
    assert ctrl.preview_layer.data.shape == (1, 120, 160)


def test_transposed_view_segments_the_displayed_plane():
    stack = np.stack([blobs(seed=s) for s in range(6)])  # (Z, Y, X)
    viewer, ctrl, factory, _ = make(stack)
    viewer.dims.order = (1, 0, 2)  # show (Z, X): rows = Z, cols = X, slider on Y
    viewer.dims.set_current_step(1, 50)
    plane = plane_of(viewer, ctrl.image_layer)
    assert (plane.row_axis, plane.col_axis) == (0, 2) and plane.shape == (6, 160)
    add_point(ctrl, (3, 50, 100))
    np.testing.assert_array_equal(factory.embedded[-1], model_input(stack[:, 50, :]))
    ctrl.commit()
    assert ctrl.labels_layer.data[3, 50, 100] == 1
    assert not ctrl.labels_layer.data[:, 49].any()


def test_rgb_image():
    rgb = np.random.default_rng(1).integers(0, 255, (100, 90, 3)).astype(np.uint8)
    _, ctrl, factory, _ = make(rgb)
    add_point(ctrl, (50, 45))
    np.testing.assert_array_equal(factory.embedded[-1], model_input(rgb, rgb=True))
    assert ctrl.commit() == [1]
    assert ctrl.labels_layer.data.shape == (100, 90)


def test_channel_axis_picks_the_channel_and_labels_span_channels():
    img = np.stack([blobs(seed=1), blobs(seed=2)])  # (C, Y, X)
    viewer, ctrl, factory, _ = make(img)
    viewer.dims.set_current_step(0, 0)
    ctrl.set_channel(0, 1)  # segment channel 1 while channel 0 is shown
    add_point(ctrl, (0, 60, 60))
    np.testing.assert_array_equal(factory.embedded[-1], model_input(img[1]))
    assert ctrl.commit() == [1]
    labels = ctrl.labels_layer
    assert labels.data.shape == (1, 120, 160) and labels.data[0, 60, 60] == 1
    # the single label plane is shown for every channel
    for c in range(2):
        viewer.dims.set_current_step(0, c)
        assert labels._slice.image.raw[60, 60] == 1


def test_non_leading_channel_axis():
    img = np.stack([np.stack([blobs(seed=10 * z + c) for c in range(3)]) for z in range(2)])
    viewer, ctrl, factory, _ = make(img)  # (Z, C, Y, X)
    viewer.dims.set_current_step(0, 1)
    viewer.dims.set_current_step(1, 0)
    ctrl.set_channel(1, None)  # the channel the slider shows
    add_point(ctrl, (1, 0, 30, 30))
    np.testing.assert_array_equal(factory.embedded[-1], model_input(img[1, 0]))
    ctrl.commit()
    labels = ctrl.labels_layer
    assert labels.data.shape == (2, 1, 120, 160)
    assert labels.data[1, 0, 30, 30] == 1 and not labels.data[0].any()
    for c in range(3):
        viewer.dims.set_current_step(1, c)
        assert labels._slice.image.raw[30, 30] == 1


# -------------------------------------------------------------- commit and undo


def test_existing_labels_are_kept_unless_overwrite():
    viewer, ctrl, _, _ = make(blobs())
    existing = np.zeros((120, 160), np.uint32)
    existing[50:70, 50:70] = 7
    labels = viewer.add_labels(existing, name="mine")
    ctrl.labels_layer = labels
    viewer.layers.selection.active = ctrl.points_layer
    add_point(ctrl, (60, 60))
    assert ctrl.commit() == [8]  # next free id
    assert (labels.data == 7).sum() == 400  # untouched
    assert (labels.data == 8).any()
    add_point(ctrl, (60, 60))
    ctrl.overwrite = True
    assert ctrl.commit() == [9]
    assert labels.data[60, 60] == 9


def test_object_entirely_on_labels_commits_nothing():
    viewer, ctrl, _, _ = make(blobs())
    labels = viewer.add_labels(np.full((120, 160), 3, np.uint32), name="full")
    ctrl.labels_layer = labels
    add_point(ctrl, (60, 60))
    assert ctrl.commit() == []
    assert "overwrite" in ctrl.status
    assert len(ctrl.points_layer.data) == 1  # prompts kept for another try


def test_undo_restores_previous_labels():
    _, ctrl, _, _ = make(blobs())
    add_point(ctrl, (40, 40))
    ctrl.commit()
    after_first = ctrl.labels_layer.data.copy()
    add_point(ctrl, (45, 50))  # overlaps label 1: only free pixels get label 2
    ctrl.commit()
    assert (ctrl.labels_layer.data == 2).any()
    ctrl.undo()
    np.testing.assert_array_equal(ctrl.labels_layer.data, after_first)
    ctrl.undo()
    assert not ctrl.labels_layer.data.any()
    ctrl.undo()  # nothing left: a message, no exception
    assert "Nothing to undo" in ctrl.status


def test_wrong_shape_output_labels_is_a_message():
    viewer, ctrl, _, _ = make(blobs())
    ctrl.labels_layer = viewer.add_labels(np.zeros((10, 10), np.uint32))
    add_point(ctrl, (40, 40))
    assert ctrl.commit() == []
    assert "needs (120, 160)" in ctrl.status


# ---------------------------------------------------------------- user errors


def test_no_image_layer_gives_a_message():
    viewer = ViewerModel()
    ctrl = PromptController(viewer, model_factory=Factory(), notify=False)
    ctrl.update()
    assert "image layer" in ctrl.status
    assert ctrl.commit() == []
    ctrl.ensure_prompt_layers()
    ctrl.prepare()
    ctrl.next_mask()
    assert len(viewer.layers) == 0


def test_empty_prompts_give_a_message():
    _, ctrl, factory, _ = make(blobs())
    assert "Click a positive point" in ctrl.status
    assert factory.calls == []  # the model is only loaded once there is something to do
    assert ctrl.commit() == []
    assert "Nothing to commit" in ctrl.status


def test_points_outside_the_image_are_ignored_with_a_message():
    _, ctrl, _, _ = make(blobs())
    add_point(ctrl, (-50, 40))
    assert "outside the image" in ctrl.status and ctrl.preview_mask() is None
    add_point(ctrl, (60, 60))
    assert "1 prompt(s) outside the image were ignored" in ctrl.status
    assert ctrl.preview_mask() is not None
    assert ctrl.commit() == [1]


def test_box_partly_outside_is_clipped_and_fully_outside_ignored():
    _, ctrl, _, _ = make(blobs())
    add_box(ctrl, (-20, -20), (30, 30))
    mask = ctrl.preview_mask() > 0
    assert mask[0, 0] and mask[28, 28] and not mask[34, 34]
    ctrl.clear_object()
    add_box(ctrl, (200, 200), (250, 250))
    assert "outside the image" in ctrl.status


def test_efficientsam_limits_are_reported_not_truncated():
    viewer = ViewerModel()
    factory = Factory(max_points=6, negatives=False)
    ctrl = PromptController(viewer, model_factory=factory, notify=False)
    ctrl.image_layer = viewer.add_image(blobs())
    ctrl.ensure_prompt_layers()
    add_point(ctrl, (50, 50))
    add_point(ctrl, (50, 70), NEGATIVE)
    assert "no learned embedding for negative points" in ctrl.status
    for i in range(4):
        add_point(ctrl, (60 + i, 60))
    assert ctrl.preview_mask() is not None  # 6 points: fine
    add_point(ctrl, (90, 90))
    assert "at most 6 prompt points" in ctrl.status
    assert not np.any(ctrl.preview_layer.data)
    assert ctrl.commit() == []


def test_model_errors_are_messages_and_not_retried_in_a_loop():
    viewer = ViewerModel()
    calls = []

    def broken(name, checkpoint, device):
        calls.append(name)
        raise RuntimeError("the checkpoint does not fit model 'mobilesam'")

    ctrl = PromptController(viewer, model_factory=broken, notify=False)
    ctrl.image_layer = viewer.add_image(blobs())
    ctrl.ensure_prompt_layers()
    add_point(ctrl, (50, 50))
    assert "does not fit" in ctrl.status and not ctrl.busy
    add_point(ctrl, (60, 60))
    assert calls == ["mobilesam"]
    ctrl.set_model(checkpoint="/other/file.pt")  # a new setting is tried again
    assert len(calls) == 2


def test_3d_display_is_a_message():
    stack = np.stack([blobs(seed=s) for s in range(3)])
    viewer, ctrl, _, _ = make(stack)
    viewer.dims.ndisplay = 3
    assert "2-D display" in ctrl.status


# ---------------------------------------------------------------- embeddings


def test_encoder_runs_once_per_plane_and_cache_makes_going_back_free():
    stack = np.stack([blobs(seed=s) for s in range(3)])
    viewer, ctrl, factory, _ = make(stack)
    viewer.dims.set_current_step(0, 0)
    add_point(ctrl, (0, 30, 30))
    assert ctrl.encoder_calls == 1
    add_point(ctrl, (0, 40, 40))
    add_point(ctrl, (0, 50, 50), NEGATIVE)
    ctrl.next_mask()
    assert ctrl.encoder_calls == 1  # prompts only re-run the decoder
    viewer.dims.set_current_step(0, 1)  # model loaded: the new slice is prefetched
    assert ctrl.encoder_calls == 2
    viewer.dims.set_current_step(0, 0)
    assert ctrl.encoder_calls == 2 and ctrl.preview_mask() is not None
    assert len(factory.models) == 1


def test_lru_cache_size_is_respected():
    stack = np.stack([blobs(seed=s) for s in range(3)])
    viewer, ctrl, _, _ = make(stack)
    ctrl.set_cache_size(1)
    viewer.dims.set_current_step(0, 0)
    add_point(ctrl, (0, 30, 30))
    viewer.dims.set_current_step(0, 1)
    viewer.dims.set_current_step(0, 0)
    assert ctrl.encoder_calls == 3


def test_contrast_limits_option_changes_the_embedding_key():
    viewer, ctrl, factory, layer = make(blobs())
    add_point(ctrl, (30, 30))
    ctrl.set_use_contrast_limits(True)
    assert ctrl.encoder_calls == 2
    layer.contrast_limits = (500, 1000)
    assert ctrl.encoder_calls == 3
    ctrl.set_use_contrast_limits(False)
    assert ctrl.encoder_calls == 3  # the percentile embedding is still cached


def test_changing_image_data_invalidates_the_cache():
    viewer, ctrl, _, layer = make(blobs())
    add_point(ctrl, (30, 30))
    layer.data = blobs(seed=5)
    assert ctrl.encoder_calls == 2


def test_model_change_builds_a_new_engine():
    _, ctrl, factory, _ = make(blobs())
    add_point(ctrl, (30, 30))
    ctrl.set_model("efficientsam_ti", device="cpu")
    assert factory.calls[-1] == ("efficientsam_ti", None, "cpu")
    assert ctrl.preview_mask() is not None


def test_lru_cache_unit():
    cache = EmbeddingCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)  # evicts "b", the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache
    cache.maxsize = 1
    assert len(cache) == 1 and "c" in cache


# ------------------------------------------------------------ keys and polarity


def test_key_bindings_on_prompt_layers():
    _, ctrl, _, _ = make(blobs())
    pts = ctrl.points_layer
    from napari.utils.key_bindings import KeymapHandler

    handler = KeymapHandler()
    handler.keymap_providers = [pts]
    handler.press_key(KEYS["toggle_polarity"])
    assert ctrl.polarity == NEGATIVE
    handler.press_key(KEYS["toggle_polarity"])
    assert ctrl.polarity == POSITIVE
    add_point(ctrl, (40, 40))
    handler.press_key(KEYS["commit"])
    assert ctrl.labels_layer.data[40, 40] == 1
    handler.press_key(KEYS["undo"])
    assert not ctrl.labels_layer.data.any()
    add_point(ctrl, (40, 40))
    handler.press_key(KEYS["clear"])
    assert len(pts.data) == 0 and ctrl.preview_mask() is None


def test_polarity_colours_points():
    _, ctrl, _, _ = make(blobs())
    add_point(ctrl, (40, 40))
    add_point(ctrl, (40, 60), NEGATIVE)
    np.testing.assert_allclose(ctrl.points_layer.face_color[0], (0, 1, 0, 1))
    np.testing.assert_allclose(ctrl.points_layer.face_color[1], (1, 0, 0, 1))


def test_user_points_layer_without_label_feature_counts_as_positive():
    viewer, ctrl, _, _ = make(blobs())
    pts = viewer.add_points(np.array([[40.0, 40.0], [80.0, 100.0]]))
    ctrl.points_layer = pts
    assert list(pts.features["label"]) == [POSITIVE, POSITIVE]
    assert set(np.unique(ctrl.preview_mask())) == {0, 1}


def test_removing_layers_is_safe():
    viewer, ctrl, _, image = make(blobs())
    add_point(ctrl, (40, 40))
    ctrl.commit()
    viewer.layers.remove(ctrl.labels_layer)
    add_point(ctrl, (80, 80))
    assert ctrl.commit() == [1]  # a new output layer
    viewer.layers.remove(ctrl.points_layer)
    viewer.layers.remove(image)
    assert ctrl.image_layer is None and "image layer" in ctrl.status
    ctrl.close()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_image_dtypes(dtype):
    img = blobs().astype(dtype)
    _, ctrl, factory, _ = make(img)
    add_point(ctrl, (60, 60))
    np.testing.assert_array_equal(factory.embedded[-1], model_input(img))
    assert ctrl.commit() == [1]


def test_image_larger_than_1024():
    _, ctrl, factory, _ = make(blobs((1500, 1200)))
    add_point(ctrl, (1300, 1100))
    assert factory.embedded[-1].shape == (1500, 1200, 3)
    assert ctrl.commit() == [1]
    r, c = centre(ctrl.labels_layer.data == 1)
    assert abs(r - 1300) < 2 and abs(c - 1100) < 2


def test_run_sync_reports_progress_and_errors():
    from napari_esam.widgets.workers import Progress, run_sync

    def job():
        yield Progress(0, 2, "a")
        yield Progress(1, 2, "b")
        return 42

    seen, out, errs = [], [], []
    run_sync(job, on_returned=out.append, on_errored=errs.append, on_progress=seen.append)
    assert [p.text for p in seen] == ["a", "b"] and out == [42] and not errs
    assert Progress(1, 2).fraction == 0.5

    def bad():
        yield Progress(0, 1)
        raise RuntimeError("boom")

    run_sync(bad, on_returned=out.append, on_errored=errs.append)
    assert str(errs[0]) == "boom" and out == [42]


def test_replaced_prompt_layer_loses_the_key_bindings():
    viewer, ctrl, _, _ = make(blobs())
    old = ctrl.points_layer
    assert any(str(k) == "C" for k in old.keymap)
    ctrl.points_layer = viewer.add_points(np.empty((0, 2)))
    assert not any(str(k) == "C" for k in old.keymap)
    assert any(str(k) == "C" for k in ctrl.points_layer.keymap)


def test_a_state_dict_checkpoint_reaches_the_model_factory_itself():
    viewer = ViewerModel()
    got = []

    def factory(name, checkpoint, device):
        got.append(checkpoint)
        return FakeModel().eval()

    ctrl = PromptController(viewer, model_factory=factory, notify=False)
    ctrl.image_layer = viewer.add_image(blobs())
    ctrl.ensure_prompt_layers()
    state = {"weights": np.zeros(1)}
    ctrl.set_model(checkpoint=state)
    add_point(ctrl, (50, 50))
    assert len(got) == 1 and got[0] is state  # not the cache key ("state_dict", id)
    assert ctrl.preview_mask() is not None
