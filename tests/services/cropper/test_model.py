"""The crop model: shapes, batched == single, input switches, padding, anchors and a short overfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.cropper.config import LossConfig, ModelConfig, profile_config
from services.cropper.engine import predict, train_one_epoch
from services.cropper.loss import SetCriterion
from services.cropper.model import (
    CropInputs,
    ProCrop,
    build_model,
    default_anchors,
    inverse_sigmoid,
    retrieved_anchors,
)
from shared.boxes import cxcywh_to_xyxy


def make_model(config: ModelConfig, seed: int = 0) -> ProCrop:
    """A seeded model whose box head is no longer zero, so boxes depend on the inputs."""
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        last = model.box_head.layers[-1]
        last.weight.normal_(0, 0.05)
        last.bias.normal_(0, 0.05)
    return model.eval()


def make_inputs(
    config: ModelConfig, batch: int = 3, text_len: int = 5, seed: int = 1
) -> CropInputs:
    """Random inputs for `config`: every neighbour has a crop, every text token is real."""
    g = torch.Generator().manual_seed(seed)
    size, k = config.input_size, config.k
    centres = torch.rand(batch, k, 2, generator=g) * 0.4 + 0.3
    sides = torch.rand(batch, k, 2, generator=g) * 0.4 + 0.4
    inputs = CropInputs(
        images=torch.randn(batch, 3, size, size, generator=g),
        aspect=torch.randn(batch, generator=g) * 0.3,
    )
    if config.cue_channels:
        inputs.cues = torch.randn(batch, 64, config.cue_channels, generator=g)
    if config.use_retrieval:
        inputs.tokens = torch.randn(batch, k, 64, config.token_dim, generator=g)
        inputs.boxes = torch.cat([centres, sides], -1)  # (B, K, 4) cxcywh
        inputs.box_mask = torch.ones(batch, k, dtype=torch.bool)
    if config.use_text:
        inputs.text = torch.randn(batch, text_len, config.text_dim, generator=g)
        inputs.text_mask = torch.ones(batch, text_len, dtype=torch.bool)
    return inputs


def run(model: ProCrop, inputs: CropInputs) -> dict:
    with torch.no_grad():
        return model(inputs)


def select(inputs: CropInputs, index: int) -> CropInputs:
    """Photo `index` of a batch, as a batch of one."""
    fields = {name: getattr(inputs, name) for name in inputs.__dataclass_fields__}
    return CropInputs(**{k: None if v is None else v[index : index + 1] for k, v in fields.items()})


def memory_shapes(model: ProCrop, inputs: CropInputs) -> tuple[int, int]:
    """(memory length, number of queries) that reach the decoder."""
    seen: dict[str, int] = {}

    def hook(_module: torch.nn.Module, args: tuple) -> None:
        tgt, _anchors, memory, _pos, _pad = args
        seen["memory"], seen["queries"] = memory.shape[1], tgt.shape[1]

    handle = model.decoder.register_forward_pre_hook(hook)
    try:
        run(model, inputs)
    finally:
        handle.remove()
    return seen["memory"], seen["queries"]


PROFILE_NAMES = ("lite", "tiny")


# --- shapes and batching ----------------------------------------------------------------------


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_output_shapes_and_box_range(name: str) -> None:
    config = profile_config(name)
    model = make_model(config)
    out = run(model, make_inputs(config, batch=2))
    q = config.num_queries + config.k + 1  # learnable anchors + one per neighbour + their median
    assert model.num_proposals == q
    assert out["logits"].shape == (2, q)
    assert out["boxes"].shape == (2, q, 4)
    assert ((out["boxes"] > 0) & (out["boxes"] < 1)).all()
    assert len(out["aux"]) == config.dec_layers - 1
    for layer in out["aux"]:
        assert layer["logits"].shape == (2, q) and layer["boxes"].shape == (2, q, 4)


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_batched_equals_one_by_one(name: str) -> None:
    config = profile_config(name)
    model = make_model(config)
    inputs = make_inputs(config, batch=3, text_len=6)
    inputs.box_mask[1, 0] = False  # photos differ in which neighbours have crops
    inputs.box_mask[2] = False
    if config.use_text:
        inputs.text_mask[0, 4:] = False  # ... and in their text lengths
    batched = run(model, inputs)
    for i in range(3):
        single = run(model, select(inputs, i))
        torch.testing.assert_close(single["logits"][0], batched["logits"][i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(single["boxes"][0], batched["boxes"][i], atol=1e-5, rtol=1e-4)


def test_predict_ranks_proposals_best_first() -> None:
    config = profile_config("tiny")
    model = make_model(config)
    inputs = make_inputs(config, batch=2)
    out = run(model, inputs)
    scores, boxes = (np.asarray(x, np.float64) for x in predict(model, inputs))
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    probs = out["logits"].sigmoid().double().numpy()
    xyxy = cxcywh_to_xyxy(out["boxes"]).clamp(0, 1).double().numpy()
    for b in range(2):
        order = np.argsort(-probs[b], kind="stable")
        np.testing.assert_allclose(scores[b], probs[b, order], atol=1e-6)
        np.testing.assert_allclose(boxes[b], xyxy[b, order], atol=1e-6)


# --- which inputs a model reads ---------------------------------------------------------------


def test_memory_and_queries_follow_the_switches() -> None:
    base = profile_config("tiny")
    inputs = make_inputs(base, batch=1, text_len=5)
    image = (base.input_size // 32) ** 2  # f_I: ResNet features at stride 32
    retrieval = base.k * 64 + image  # P(R) of the K token grids, then CrossAttn(f_I, P(R))
    crops, text = base.k, 5 + image  # one token per neighbour crop; P'(M), then CrossAttn(f_I, M)
    cases = {
        (True, True, True): (image + retrieval + crops + text, base.num_queries + base.k + 1),
        (True, False, True): (image + retrieval + text, base.num_queries),
        (False, True, True): (image + text, base.num_queries),
        (True, True, False): (image + retrieval + crops, base.num_queries + base.k + 1),
        (False, False, False): (image, base.num_queries),
    }
    for (retrieve, annotate, read_text), expected in cases.items():
        config = profile_config(
            "tiny", use_retrieval=retrieve, use_annotations=annotate, use_text=read_text
        )
        assert memory_shapes(make_model(config), inputs) == expected, (
            retrieve,
            annotate,
            read_text,
        )


def test_model_without_retrieval_or_text_ignores_them() -> None:
    config = profile_config("tiny", use_retrieval=False, use_text=False)
    model = make_model(config)
    full = make_inputs(profile_config("tiny"), batch=2)
    bare = CropInputs(images=full.images, aspect=full.aspect)
    torch.testing.assert_close(run(model, bare)["boxes"], run(model, full)["boxes"])
    assert not hasattr(model, "retrieval_fusion") and not hasattr(model, "text_fusion")


@pytest.mark.parametrize(
    ("missing", "overrides"),
    [
        ("tokens", {}),
        ("boxes", {}),
        ("box_mask", {}),
        ("text", {}),
        ("text_mask", {}),
        ("tokens", {"use_annotations": False, "use_text": False}),
    ],
)
def test_missing_inputs_are_named(missing: str, overrides: dict) -> None:
    config = profile_config("tiny", **overrides)
    inputs = make_inputs(config, batch=1)
    setattr(inputs, missing, None)
    with pytest.raises(ValueError, match=f"`{missing}`"):
        run(make_model(config), inputs)


def test_lite_backbone_needs_cues() -> None:
    config = profile_config("lite")
    inputs = make_inputs(config, batch=1)
    inputs.cues = None
    with pytest.raises(ValueError, match="cue"):
        run(make_model(config), inputs)


# --- padding and masked neighbours ------------------------------------------------------------


def test_padded_text_tokens_do_not_change_the_output() -> None:
    config = profile_config("tiny")
    model = make_model(config)
    inputs = make_inputs(config, batch=1, text_len=4)
    padded = make_inputs(config, batch=1, text_len=4)
    garbage = torch.randn(1, 3, config.text_dim) * 10
    padded.text = torch.cat([inputs.text, garbage], 1)  # (1, 7, D)
    padded.text_mask = torch.tensor([[True] * 4 + [False] * 3])
    for key in ("logits", "boxes"):
        torch.testing.assert_close(
            run(model, padded)[key], run(model, inputs)[key], atol=1e-5, rtol=1e-4
        )


def test_neighbour_without_crop_only_acts_through_the_median() -> None:
    config = profile_config("tiny")
    model = make_model(config)
    inputs = make_inputs(config, batch=1)
    inputs.box_mask[0, 1] = False
    moved = make_inputs(config, batch=1)
    moved.box_mask = inputs.box_mask.clone()
    moved.boxes = inputs.boxes.clone()
    moved.boxes[0, 1] = torch.tensor([0.9, 0.1, 0.05, 0.3])  # any value: the crop is masked
    out, out_moved = run(model, inputs), run(model, moved)
    for key in ("logits", "boxes"):
        torch.testing.assert_close(out_moved[key], out[key], atol=1e-5, rtol=1e-4)
    # The masked neighbour's anchor is the median of the present crops (0 and 2 of K = 3).
    anchors = retrieved_anchors(inputs.boxes, inputs.box_mask)[0]
    present = inputs.boxes[0, [0, 2]]
    torch.testing.assert_close(anchors[1], present.median(0).values)
    torch.testing.assert_close(anchors[1], anchors[-1])


def test_retrieved_anchors_by_hand() -> None:
    boxes = torch.tensor(
        [
            [[0.5, 0.5, 0.8, 0.6], [0.4, 0.6, 0.5, 0.9], [0.6, 0.3, 0.7, 0.2]],
            [[0.2, 0.2, 0.2, 0.2], [0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]],
            [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        ]
    )  # (B = 3, K = 3, 4) cxcywh
    mask = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    anchors = retrieved_anchors(boxes, mask)  # (3, 4, 4)
    assert anchors.shape == (3, 4, 4)
    # All present: crops unchanged, the median is taken per coordinate.
    torch.testing.assert_close(anchors[0, :3], boxes[0])
    torch.testing.assert_close(anchors[0, 3], torch.tensor([0.5, 0.5, 0.7, 0.6]))
    # Two present: torch's median of an even count is the lower middle value; it fills the gap.
    torch.testing.assert_close(anchors[1, 2], torch.tensor([0.2, 0.2, 0.2, 0.2]))
    torch.testing.assert_close(anchors[1, 3], anchors[1, 2])
    # None present: every anchor is the whole photo, kept inside (EPS, 1 - EPS).
    whole = torch.tensor([0.5, 0.5, 0.999, 0.999])
    torch.testing.assert_close(anchors[2], whole.expand(4, 4))
    # No mask at all means every crop is present.
    torch.testing.assert_close(retrieved_anchors(boxes[:1], None), anchors[:1])


# --- initialisation ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_proposals_start_on_their_anchors(name: str) -> None:
    config = profile_config(name)
    torch.manual_seed(0)
    model = build_model(config).eval()  # box head zero-initialised
    inputs = make_inputs(config, batch=2)
    inputs.box_mask[1, :2] = False
    learned = default_anchors(config.num_queries).expand(2, -1, -1)
    anchors = torch.cat([learned, retrieved_anchors(inputs.boxes, inputs.box_mask)], 1)
    expected = inverse_sigmoid(anchors).sigmoid()
    out = run(model, inputs)
    for layer in [out, *out["aux"]]:
        torch.testing.assert_close(layer["boxes"], expected, atol=1e-6, rtol=1e-5)
    # The focal-loss prior: every proposal starts with a score near 0.01.
    assert out["logits"].sigmoid().sub(0.01).abs().max() < 0.05


def test_default_anchors_are_distinct_and_centred() -> None:
    anchors = default_anchors(24)
    assert len(torch.unique(anchors, dim=0)) == 24
    assert ((anchors[:, :2] > 0.4) & (anchors[:, :2] < 0.6)).all()
    assert ((anchors[:, 2:] >= 0.55) & (anchors[:, 2:] <= 0.95)).all()


# --- training ---------------------------------------------------------------------------------


def test_loss_falls_when_overfitting_tiny_photos() -> None:
    config = profile_config("tiny")
    torch.manual_seed(0)
    model = build_model(config)
    inputs = make_inputs(config, batch=8, seed=3)
    g = torch.Generator().manual_seed(4)
    centres = torch.rand(8, 1, 2, generator=g) * 0.3 + 0.35
    sides = torch.rand(8, 1, 2, generator=g) * 0.3 + 0.5
    targets = list(torch.cat([centres, sides], -1))  # one (1, 4) cxcywh crop per photo
    weights = [torch.ones(1) for _ in targets]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps: list[dict[str, float]] = []
    batches = [(inputs, targets, weights)] * 60
    mean = train_one_epoch(
        model, SetCriterion(LossConfig()), batches, optimizer, torch.device("cpu"),
        on_step=steps.append,
    )  # fmt: skip
    first, last = steps[0], steps[-1]
    assert len(steps) == 60
    assert mean["loss"] == pytest.approx(sum(s["loss"] for s in steps) / 60)
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    # Not only the score prior: the matched boxes move onto their crops too.
    assert last["l1"] < 0.8 * first["l1"] and last["giou"] < 0.8 * first["giou"], (first, last)
