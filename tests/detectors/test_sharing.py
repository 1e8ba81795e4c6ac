"""Several tasks on one frozen backbone: the weights once in memory; for E3VA and FIXED the frozen
forward once per batch, with every task's predictions exactly its own."""
import pytest
import torch

from detectors.engines import build_detector
from detectors.sharing import share_backbone, swin_inside

TINY = dict(depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8))
OPTIONS = dict(box_score_thresh=0.0, box_detections_per_img=20, rpn_pre_nms_top_n_test=100,
               rpn_post_nms_top_n_test=50)


def task(method: str, seed: int, detector: str = "mask_rcnn"):
    """A 'trained' task: the same frozen weights (seed 0), its own trainable ones (``seed``)."""
    torch.manual_seed(0)
    options = OPTIONS if detector != "retinanet" else dict(score_thresh=0.0, detections_per_img=20)
    model = build_detector("torchvision", detector, 3, "swin_t", method, detector_options=options, **TINY).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def images():
    generator = torch.Generator().manual_seed(1)
    return [[torch.rand(3, 64, 96, generator=generator)], [torch.rand(3, 96, 64, generator=generator)]]


def count_frozen_embeddings(tasks) -> list[int]:
    """How often any task's frozen Swin embeds a batch: once per frozen forward."""
    calls = [0]
    for model in tasks:
        swin_inside(model.backbone).patch_embed.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("methods", [("e3va", "e3va", "e3va"), ("fixed", "fixed", "e3va")])
def test_three_tasks_run_the_frozen_backbone_once_per_image_and_predict_as_alone(methods):
    tasks = [task(method, seed) for seed, method in enumerate(methods, start=1)]
    alone = [[model.predict(batch)[0] for batch in images()] for model in tasks]
    shared = share_backbone([model.backbone for model in tasks])
    calls = count_frozen_embeddings(tasks)
    for index, batch in enumerate(images()):
        for model, own in zip(tasks, alone):
            prediction = model.predict(batch)[0]
            assert prediction.keys() == own[index].keys()
            for key, value in prediction.items():
                assert torch.equal(value, own[index][key]), key
        # FIXED's features and E3VA's frozen pass are two computations: one each per image
        assert calls[0] == (index + 1) * len(set(methods))
    assert shared.computed == len(images()) * len(set(methods))
    # the tasks differ (their own trainable weights), and hold the frozen weights once
    assert not torch.equal(alone[0][0]["scores"], alone[1][0]["scores"])
    first = swin_inside(tasks[0].backbone)
    for model in tasks[1:]:
        assert swin_inside(model.backbone).patch_embed.proj.weight is first.patch_embed.proj.weight


def test_in_backbone_methods_share_the_frozen_weights_and_run_their_own_pass():
    tasks = [task("lora", 1), task("e3va", 2), task("bitfit", 3)]
    alone = [model.predict(images()[0])[0] for model in tasks]
    shared = share_backbone([model.backbone for model in tasks])
    calls = count_frozen_embeddings(tasks)
    for model, own in zip(tasks, alone):
        prediction = model.predict(images()[0])[0]
        assert all(torch.equal(prediction[key], own[key]) for key in own)
    assert calls[0] == 3 and shared.computed == 1  # only E3VA's frozen pass is shareable
    first = dict(swin_inside(tasks[0].backbone).named_parameters())
    lora = swin_inside(tasks[0].backbone)
    for model in tasks[1:]:
        for name, param in swin_inside(model.backbone).named_parameters():
            if name in first and not param.requires_grad and not first[name].requires_grad:
                assert param is first[name], name
    bitfit_biases = [p for n, p in swin_inside(tasks[2].backbone).named_parameters() if n.endswith("bias")
                     and p.requires_grad]
    assert bitfit_biases and all(p is not first.get(n) for n, p in swin_inside(tasks[2].backbone).named_parameters()
                                 if p.requires_grad)
    assert lora is not swin_inside(tasks[1].backbone)


def test_tasks_trained_on_other_frozen_weights_are_refused():
    first, second = task("e3va", 1), task("e3va", 2)
    with torch.no_grad():
        swin_inside(second.backbone).patch_embed.proj.weight.add_(1.0)
    with pytest.raises(ValueError, match="patch_embed.proj.weight differs"):
        share_backbone([first.backbone, second.backbone])


class SideNetwork(torch.nn.Module):
    """A new side-network method's tuned backbone, written as a method author would: its own class, saying
    through the two hooks where its pre-trained Swin is and that its frozen pass does not depend on the task."""

    shared_pass = None

    def __init__(self, swin, seed: int):
        super().__init__()
        self.swin = swin.requires_grad_(False)
        self.side = torch.nn.Linear(swin.out_channels[-1], swin.out_channels[-1])
        torch.nn.init.normal_(self.side.weight, generator=torch.Generator().manual_seed(seed))

    @property
    def pretrained_swin(self):
        return self.swin

    def shareable_pass(self) -> str:
        return "side network"

    def forward(self, images):
        features = self.shared_pass(images, self.swin) if self.shared_pass is not None else self.swin(images)
        return self.side(features["res5"].permute(0, 2, 3, 1))


def test_a_side_network_of_a_new_method_shares_its_frozen_pass_by_saying_so():
    from detectors.backbones import build_swin
    swins = []
    for _ in range(2):
        torch.manual_seed(0)
        swins.append(build_swin("swin_t", **TINY))
    tasks = [SideNetwork(swin, seed).eval() for seed, swin in enumerate(swins)]
    batch = torch.rand(2, 3, 64, 96)
    alone = [model(batch) for model in tasks]
    shared = share_backbone(tasks)
    assert tasks[1].swin.patch_embed.proj.weight is tasks[0].swin.patch_embed.proj.weight
    together = [model(batch) for model in tasks]
    assert shared.computed == 1 and all(torch.equal(a, b) for a, b in zip(alone, together))
    assert not torch.equal(together[0], together[1])
