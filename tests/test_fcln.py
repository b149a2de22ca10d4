"""DenseCap FCLN (dam.fcln): box maths, anchor sampling, NMS cap, bilinear sampler gradients,
LSTM conventions, a tiny end-to-end training run, save/load and user errors. CPU, tiny sizes."""

import copy

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from dam.errors import DamInputError
from dam.fcln import (
    FclnBackbone,
    FclnConfig,
    FclnImageProcessor,
    FclnLanguageModel,
    FclnModel,
    FclnVocabulary,
    bilinear_sample_boxes,
    build_vocabulary,
    decode_boxes,
    encode_boxes,
    make_anchors,
    paper_anchor_sizes,
    sample_anchors,
    select_proposals,
)
from dam.fcln.language_model import caption_targets
from dam.fcln.vocabulary import END_ID, PAD_ID, START_ID

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
WORDS = ["red", "green", "blue", "box", "a", "big", "small", "on", "the", "left"]


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_config(**overrides) -> FclnConfig:
    settings = dict(
        backbone="tiny", tiny_backbone_channels=16, anchors=[[16, 16], [32, 32], [48, 24], [24, 48]],
        localization_hidden_size=16, rpn_batch_size=32, recognition_hidden_size=32, recognition_dropout=0.0,
        grid_size=(3, 3), word_embedding_size=16, lstm_hidden_size=32, vocabulary=WORDS,
        test_num_proposals=20, image_longer_side=64,
    )
    settings.update(overrides)
    return FclnConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> FclnModel:
    torch.manual_seed(seed)
    return FclnModel(tiny_config(**overrides))


def random_boxes(count: int, seed: int, size: float = 100.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=generator) * size
    extent = torch.rand(count, 2, generator=generator) * size + 1.0
    return torch.cat((corner, corner + extent), dim=1)


# -- boxes -----------------------------------------------------------------------------------


def test_box_encode_decode_round_trip():
    boxes, references = random_boxes(50, seed=0), random_boxes(50, seed=1)
    offsets = encode_boxes(boxes, references)
    torch.testing.assert_close(decode_boxes(offsets, references), boxes, rtol=1e-5, atol=1e-4)
    # the paper's parameterisation: x = xa + tx*wa, w = wa*exp(tw)
    anchor = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # centre (20, 40), size (20, 40)
    decoded = decode_boxes(torch.tensor([[0.5, -0.25, float(np.log(2.0)), 0.0]]), anchor)
    torch.testing.assert_close(decoded, torch.tensor([[10.0, 10.0, 50.0, 50.0]]))  # centre (30, 30), 40 x 40


def test_anchor_grid_and_paper_defaults():
    sizes = paper_anchor_sizes()
    assert len(sizes) == 12 and [64.0, 64.0] in sizes and [512.0, 512.0] in sizes
    anchors = make_anchors(2, 3, 16, torch.tensor([[10.0, 20.0], [30.0, 30.0]]), offset=8.0)
    assert anchors.shape == (2 * 3 * 2, 4)
    # (row 1, column 2, anchor 0) is centred on pixel (40, 24)
    torch.testing.assert_close(anchors[(1 * 3 + 2) * 2], torch.tensor([35.0, 14.0, 45.0, 34.0]))
    # with ResNet-50's offset the same cell is centred on (32.5, 16.5)
    shifted = make_anchors(2, 3, 16, torch.tensor([[10.0, 20.0], [30.0, 30.0]]), offset=0.5)
    torch.testing.assert_close(shifted[(1 * 3 + 2) * 2], torch.tensor([27.5, 6.5, 37.5, 26.5]))


# -- localization layer: training samples -------------------------------------------------------


def hand_made_anchors():
    """20 near-copies of gt 0 (IoU >= 0.7), one half-overlap of gt 1 (its best, IoU < 0.7),
    a mid-overlap band (0.3..0.7, ignorable) and 100 far-away negatives."""
    gt = torch.tensor([[100.0, 100.0, 200.0, 200.0], [400.0, 100.0, 480.0, 180.0]])
    near = torch.stack([gt[0] + torch.tensor([d, -d, d, d]) for d in torch.linspace(-8, 8, 20)])
    half = torch.tensor([[440.0, 100.0, 520.0, 180.0]])  # IoU with gt 1 = 1/3
    middle = torch.tensor([[130.0, 100.0, 230.0, 200.0]])  # IoU with gt 0 ~ 0.54
    far = torch.stack([torch.tensor([600.0 + 3 * i, 600.0, 640.0 + 3 * i, 640.0]) for i in range(100)])
    return torch.cat((near, half, middle, far)), gt, 20  # index 20: the half-overlap anchor


@pytest.mark.parametrize("seed", range(5))
def test_sampling_rules(seed):
    anchors, gt, best_of_gt1 = hand_made_anchors()
    iou = box_iou(anchors, gt)
    batch_size = 16
    sample = sample_anchors(anchors, gt, batch_size=batch_size, generator=torch.Generator().manual_seed(seed))
    positive, negative = sample.positive.tolist(), sample.negative.tolist()
    assert len(positive) <= batch_size // 2
    assert len(positive) + len(negative) == batch_size
    assert not set(positive) & set(negative)
    best_anchor_per_gt = set(iou.argmax(dim=0).tolist())
    for index in positive:
        assert iou[index].max() >= 0.7 or index in best_anchor_per_gt
    assert all(iou[index].max() < 0.3 for index in negative)
    # the best anchor of gt 1 is kept although its IoU is only 1/3, and it carries gt 1's index
    assert iou[best_of_gt1, 1] < 0.7 and best_of_gt1 in positive
    assert sample.matched_gt[positive.index(best_of_gt1)] == 1
    assert all(sample.matched_gt[i] == 0 for i, a in enumerate(positive) if a != best_of_gt1)


def test_sampling_with_few_anchors_and_invalid_ones():
    anchors, gt, best_of_gt1 = hand_made_anchors()
    valid = torch.ones(len(anchors), dtype=torch.bool)
    valid[best_of_gt1] = False  # e.g. crossing the image border: it may be neither
    sample = sample_anchors(anchors, gt, batch_size=1000, valid=valid)
    positive, negative = set(sample.positive.tolist()), set(sample.negative.tolist())
    assert best_of_gt1 not in positive | negative
    assert len(negative) == 100  # every far anchor, the mid-overlap one ignored
    assert len(positive) == 20


# -- test-time proposals ---------------------------------------------------------------------


def test_nms_caps_the_number_of_proposals():
    columns = torch.arange(40.0)
    corners = torch.stack(torch.meshgrid(columns * 10, columns * 10, indexing="ij"), -1).reshape(-1, 2)
    boxes = torch.cat((corners, corners + 8), dim=1)  # 1600 disjoint boxes
    scores = torch.rand(len(boxes), generator=torch.Generator().manual_seed(0))
    keep = select_proposals(boxes, scores, 400, 400, nms_iou=0.7, max_proposals=300)
    assert keep.numel() == 300
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])
    duplicated = torch.cat((boxes, boxes + 0.5))  # near-duplicates NMS must remove
    keep = select_proposals(duplicated, torch.rand(len(duplicated)), 400, 400, nms_iou=0.7, max_proposals=5000)
    assert keep.numel() == len(boxes)

    model = tiny_model(test_num_proposals=7).eval()
    output = model(torch.randn(2, 3, 96, 80))
    assert all(len(boxes) <= 7 for boxes in output.boxes)
    for boxes in output.boxes:
        assert torch.all(boxes[:, 0::2] >= 0) and torch.all(boxes[:, 0::2] <= 80)
        assert torch.all(boxes[:, 1::2] >= 0) and torch.all(boxes[:, 1::2] <= 96)


# -- bilinear sampler ------------------------------------------------------------------------


def receptive_field_centre(backbone: FclnBackbone, cell: int, size: int = 256) -> float:
    """Input x where feature cell (cell, cell) looks: the centroid of its input gradient in a
    linearised copy of the backbone (max-pools as average pools, every conv weight 1 / fan-in), in
    continuous pixel coordinates (pixel k's centre is k + 0.5)."""
    linear = copy.deepcopy(backbone).eval()

    def average_pools(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, torch.nn.MaxPool2d):
                setattr(module, name, torch.nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
            else:
                average_pools(child)

    average_pools(linear)
    with torch.no_grad():
        for module in linear.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.fill_(1.0 / module.weight[0].numel())
                if module.bias is not None:
                    module.bias.zero_()
    image = torch.ones(1, 3, size, size, requires_grad=True)
    linear(image)[0, :, cell, cell].sum().backward()
    weight = image.grad[0].abs().sum(dim=(0, 1))  # (W,) over columns
    return float((weight * (torch.arange(size) + 0.5)).sum() / weight.sum())


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "tiny"])
def test_anchors_and_sampler_sit_on_the_receptive_field_centres(name):
    backbone = FclnBackbone(name, tiny_channels=8)
    cell = 6
    centre = receptive_field_centre(backbone, cell)
    assert centre == pytest.approx({"vgg16": 16 * cell + 8, "resnet50": 16 * cell + 0.5, "tiny": 16 * cell + 0.5}[name],
                                   abs=0.05)
    anchors = make_anchors(cell + 1, cell + 1, backbone.stride, torch.tensor([[16.0, 16.0]]), backbone.feature_offset)
    x0, y0, x1, y1 = anchors[cell * (cell + 1) + cell].tolist()
    assert (x0 + x1) / 2 == pytest.approx(centre, abs=0.05) and (y0 + y1) / 2 == pytest.approx(centre, abs=0.05)
    # A 1 x 1 sample of the box centred there reads exactly that cell.
    features = torch.randn(3, cell + 4, cell + 4)
    box = torch.tensor([[x0, y0, x1, y1]])
    sampled = bilinear_sample_boxes(features, box, (1, 1), backbone.stride, backbone.feature_offset)
    torch.testing.assert_close(sampled[0, :, 0, 0], features[:, cell, cell])


def test_bilinear_sampler_reads_cell_centres_and_passes_gradient_to_boxes():
    torch.manual_seed(0)
    features = torch.randn(5, 4, 6)  # (C, Hf, Wf), stride 16 -> a 64 x 96 image
    cell = torch.tensor([[2 * 16.0, 1 * 16.0, 3 * 16.0, 2 * 16.0]])  # exactly cell (row 1, column 2)
    sampled = bilinear_sample_boxes(features, cell, (1, 1), stride=16, offset=8.0)
    torch.testing.assert_close(sampled[0, :, 0, 0], features[:, 1, 2])

    boxes = torch.tensor([[5.0, 7.0, 60.0, 40.0], [20.0, 3.0, 90.0, 61.0]], requires_grad=True)
    features.requires_grad_(True)
    sampled = bilinear_sample_boxes(features, boxes, (7, 7), stride=16, offset=8.0)
    assert sampled.shape == (2, 5, 7, 7)
    (sampled * torch.randn_like(sampled)).sum().backward()
    assert boxes.grad is not None and torch.isfinite(boxes.grad).all()
    assert (boxes.grad.abs() > 0).all()
    assert features.grad.abs().sum() > 0


# -- language model --------------------------------------------------------------------------


def test_teacher_forcing_shapes_and_start_end_convention():
    torch.manual_seed(0)
    lm = FclnLanguageModel(code_size=8, vocab_size=12, embedding_size=6, hidden_size=10)
    captions = torch.tensor([[4, 5, 6, PAD_ID], [7, END_ID, PAD_ID, PAD_ID], [8, 9, 10, 11]])
    words, targets = caption_targets(captions, max_words=3)  # the last caption is cut to 3 words
    assert words.tolist() == [[4, 5, 6], [7, 0, 0], [8, 9, 10]]
    assert targets.tolist() == [[4, 5, 6, END_ID], [7, END_ID, 0, 0], [8, 9, 10, END_ID]]
    seen = []
    lm.embedding.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    logits = lm(torch.randn(3, 8), words)
    assert logits.shape == (3, 4, 12)  # (R, L + 1, V): one prediction per word and one for <end>
    assert torch.all(seen[0][:, 0] == START_ID)  # t = 0 is <start>; t = -1 is the region code
    torch.testing.assert_close(seen[0][:, 1:], words)


def test_region_code_enters_the_lstm_through_linear_and_relu():
    torch.manual_seed(0)
    lm = FclnLanguageModel(code_size=8, vocab_size=12, embedding_size=6, hidden_size=10).eval()
    codes, words = torch.randn(3, 8), torch.randint(4, 12, (3, 5))

    def outputs(bias: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            lm.code_projection.weight.zero_()
            lm.code_projection.bias.fill_(bias)
        return lm(codes, words), lm.generate(codes, max_length=6)

    negative, zero, positive = outputs(-1.0), outputs(0.0), outputs(1.0)
    # A negative projection is cut to zero before the LSTM, in teacher forcing and generation alike.
    torch.testing.assert_close(negative[0], zero[0])
    assert torch.equal(negative[1], zero[1])
    assert not torch.allclose(positive[0], zero[0])


def test_generation_stops_at_end_per_sequence():
    torch.manual_seed(0)
    vocabulary = FclnVocabulary(["a", "red", "box", "big", "blue", "on", "the", "left"])
    lm = FclnLanguageModel(code_size=4, vocab_size=len(vocabulary), embedding_size=16, hidden_size=32)
    codes = torch.eye(4)[:2] * 3
    texts = ["red box", "a big blue box on the left"]
    words, targets = caption_targets(vocabulary.encode_batch(texts), max_words=14)
    optimizer = torch.optim.Adam(lm.parameters(), lr=0.03)
    for _ in range(150):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(lm(codes, words).flatten(0, 1), targets.flatten(), ignore_index=PAD_ID)
        loss.backward()
        optimizer.step()
    ids = lm.generate(codes, max_length=15)
    assert vocabulary.decode_batch(ids) == texts
    assert ids.shape == (2, 8)  # the loop ended when the longest caption did (7 words + <end>)
    assert ids[0].tolist() == [*vocabulary.encode("red box"), END_ID, *[PAD_ID] * 5]  # pad after its own <end>
    assert lm.generate(codes, max_length=3).shape == (2, 3)  # the length cap holds
    sampled = lm.generate(codes, max_length=15, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert sampled.shape[0] == 2 and not (sampled == START_ID).any()


def test_vocabulary():
    words = build_vocabulary(["A red box.", "the red car", "red"], min_count=2)
    assert words == ["<pad>", "<start>", "<end>", "<unk>", "red"]
    vocabulary = FclnVocabulary(words)
    assert vocabulary.encode("Red, bus!") == [4, 3]
    assert vocabulary.decode([4, 3, END_ID, 4]) == "red <unk>"
    assert len(FclnVocabulary(size=10)) == 10


# -- end to end ------------------------------------------------------------------------------


def synthetic_dataset(count: int = 4, size: int = 64):
    """Images with one or two coloured rectangles on grey, captioned "<colour> box"."""
    rng = np.random.default_rng(0)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    images, targets = [], []
    for index in range(count):
        pixels = np.full((size, size, 3), 128, dtype=np.uint8)
        boxes, captions = [], []
        for colour in list(COLOURS)[index % 3: index % 3 + 1 + index % 2]:
            x0, y0 = rng.integers(0, size // 2, 2)
            w, h = rng.integers(16, size // 2, 2)
            pixels[y0: y0 + h, x0: x0 + w] = COLOURS[colour]
            boxes.append([x0, y0, x0 + w, y0 + h])
            captions.append(f"{colour} box")
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
        images.append((tensor - mean) / std)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "captions": captions})
    return torch.stack(images), targets


def test_training_on_a_tiny_synthetic_set_lowers_the_loss():
    model = tiny_model(seed=0).train()
    images, targets = synthetic_dataset()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        output = model(images, targets)
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.6 * first, (first, last)
    parts = output.loss_parts()
    assert set(parts) == {"objectness_loss", "anchor_box_loss", "final_score_loss", "final_box_loss", "caption_loss"}
    weighted = 0.1 * (parts["objectness_loss"] + parts["anchor_box_loss"] + parts["final_score_loss"]
                      + parts["final_box_loss"]) + parts["caption_loss"]
    assert abs(weighted - output.loss.item()) < 1e-4

    model.eval()
    detections = model.generate(images, max_regions=3)
    assert len(detections) == 4
    for detection in detections:
        assert detection.boxes.shape == (3, 4) and detection.scores.shape == (3,)
        assert len(detection.captions) == 3
        assert all(caption.endswith("box") for caption in detection.captions)


def test_list_of_differently_sized_images_and_string_or_id_captions():
    model = tiny_model()
    images = [torch.randn(3, 64, 48), torch.randn(3, 40, 80)]
    boxes = [torch.tensor([[4.0, 4.0, 30.0, 40.0]]), torch.tensor([[10.0, 5.0, 60.0, 35.0]])]
    by_text = [{"boxes": b, "captions": ["red box"]} for b in boxes]
    ids = model.vocabulary.encode_batch(["red box"])
    by_ids = [{"boxes": b, "captions": ids} for b in boxes]
    torch.manual_seed(1)
    loss_text = model(images, by_text).loss
    torch.manual_seed(1)
    loss_ids = model(images, by_ids).loss
    torch.testing.assert_close(loss_text, loss_ids)
    assert len(model.eval()(images).boxes) == 2


@pytest.mark.parametrize("backprop_into_boxes", [True, False])
def test_recognition_and_caption_losses_reach_the_anchor_offsets_through_the_sampler(backprop_into_boxes):
    # With the localization layer's own terms off, only the path through the sampled boxes is left.
    model = tiny_model(objectness_loss_weight=0.0, anchor_box_loss_weight=0.0, backprop_into_boxes=backprop_into_boxes)
    images, targets = synthetic_dataset(count=2)
    model(images, targets).loss.backward()
    gradient = model.localization.offset.weight.grad
    assert (gradient is not None and gradient.abs().sum() > 0) == backprop_into_boxes


def test_detect_maps_boxes_to_original_pixels():
    model = tiny_model().eval()
    image = np.random.default_rng(0).integers(0, 256, (50, 100, 3), dtype=np.uint8)
    processor = FclnImageProcessor.from_config(model.config)
    batch = processor(image)
    assert batch.pixel_values[0].shape == (3, 32, 64)  # longer side -> 64
    boxes = torch.tensor([[10.0, 5.0, 90.0, 45.0]])
    torch.testing.assert_close(processor.boxes_to_original(processor.boxes_to_input(boxes, batch, 0), batch, 0), boxes)
    detections = model.detect([image], max_regions=4)
    assert len(detections) == 1 and len(detections[0].captions) == len(detections[0].boxes) <= 4
    assert torch.all(detections[0].boxes[:, 0::2] <= 100) and torch.all(detections[0].boxes[:, 1::2] <= 50)


def test_paper_default_loss_weights_and_sizes():
    config = FclnConfig()
    assert (config.backbone, config.num_anchors, config.rpn_batch_size) == ("vgg16", 12, 256)
    assert config.test_num_proposals == 300
    assert (config.proposal_nms_iou, tuple(config.grid_size), config.recognition_hidden_size) == (0.7, (7, 7), 4096)
    assert (config.lstm_hidden_size, config.max_caption_length, config.image_longer_side) == (512, 15, 720)
    assert (config.objectness_loss_weight, config.caption_loss_weight) == (0.1, 1.0)
    assert config.resolved_frozen_backbone_convs == 4


def test_first_convs_freeze_only_over_imagenet_weights(tmp_path, monkeypatch, caplog):
    def conv_trainable(model):
        return [m.weight.requires_grad for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]

    random_start = FclnModel(tiny_config(backbone="vgg16"))
    assert all(conv_trainable(random_start)) and random_start.config.frozen_backbone_convs == 0
    assert "model.backbone_weights" in caplog.text and "ImageNet" in caplog.text

    # With weights (their loading stubbed out: only the freezing is under test) conv1_1..conv2_2
    # stay fixed, and a saved model keeps them fixed when loaded to resume training.
    monkeypatch.setattr(FclnModel, "load_imagenet_weights", lambda self, path: None)
    pretrained = FclnModel(tiny_config(backbone="vgg16"), backbone_weights="vgg16-397923af.pth")
    assert conv_trainable(pretrained) == [False] * 4 + [True] * 9
    pretrained.save_pretrained(tmp_path)
    caplog.clear()
    assert conv_trainable(FclnModel.from_pretrained(tmp_path)) == [False] * 4 + [True] * 9
    assert "random weights" not in caplog.text
    explicit = FclnModel(tiny_config(backbone="vgg16", frozen_backbone_convs=2))
    assert conv_trainable(explicit) == [False] * 2 + [True] * 11


# -- checkpoints and errors --------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(seed=3).eval()
    images = torch.randn(2, 3, 64, 64)
    before = model.generate(images, max_regions=5)
    model.save_pretrained(tmp_path)
    loaded = FclnModel.from_pretrained(tmp_path).eval()
    after = loaded.generate(images, max_regions=5)
    assert loaded.config.to_dict()["vocabulary"] == model.config.vocabulary
    for a, b in zip(before, after):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
        assert torch.equal(a.token_ids, b.token_ids) and a.captions == b.captions


def test_user_errors(tmp_path):
    with pytest.raises(DamInputError, match="backbone='vgg19'"):
        FclnConfig(backbone="vgg19")
    with pytest.raises(DamInputError, match="does not exist"):
        FclnModel(tiny_config(backbone="resnet50"), backbone_weights=tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(DamInputError, match="not a torchvision resnet50 state dict"):
        FclnModel(tiny_config(backbone="resnet50"), backbone_weights=wrong)
    with pytest.raises(DamInputError, match="'tiny' backbone"):
        FclnModel(tiny_config(), backbone_weights=wrong)
    model = tiny_model()
    with pytest.raises(DamInputError, match="2 boxes but 1 captions"):
        two_boxes = torch.tensor([[0.0, 0, 9, 9], [1.0, 1, 20, 20]])
        model(torch.randn(1, 3, 64, 64), [{"boxes": two_boxes, "captions": ["red"]}])
    with pytest.raises(DamInputError, match="images has shape"):
        model(torch.randn(3, 64))
