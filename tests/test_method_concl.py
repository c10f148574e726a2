"""ConCL's defining properties: which regions form positives — concepts found by k-means on an unaugmented
reference view (the union of the two crops), carried to each view's grid through the crop geometry (flips
included), and prototypes paired only for concepts present in both views — plus the warm-up on the
instance loss and the concept queue."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.methods import build_method, parse_method
from bench.methods.concl import (
    ReferenceViews,
    concept_map,
    cosine_kmeans,
    paired_prototypes,
    relative_box,
    union_boxes,
)
from tests.conftest import random_images, tiny_backbone, tiny_context


def make(text: str = "concl:hidden_dim=64", total_steps: int = 10, pool_size: int = 64):
    backbone = tiny_backbone()
    ctx = tiny_context(backbone, total_steps=total_steps, pool_size=pool_size)
    return build_method(parse_method(text), backbone, ctx).train()


def test_defaults():
    spec = parse_method("concl")
    assert spec.cfg == {"momentum": 0.999, "queue": 16384, "temperature": 0.2, "proj_dim": 128, "hidden_dim": 2048,
                        "num_concepts": 8, "cluster_stage": 4, "concept_weight": 1.0, "warmup": 0.1,
                        "kmeans_iters": 10, "shuffle_bn": True, "exclude_self": True}
    assert spec.cls.recipe == "mocov2" and spec.cls.group == "dense contrastive"
    method = make()
    assert method.cluster_index == -2  # C4, the stride-16 map
    assert method.warmup_steps == 1 and method.momentum_at(7) == 0.999
    assert method.concept_queue.size == 512 and method.concepts_per_step(4) == 32  # 8 concepts × B


def test_reference_box_and_relative_boxes_by_hand():
    box1, box2 = torch.tensor([[0.1, 0.2, 0.5, 0.6]]), torch.tensor([[0.3, 0.0, 0.9, 0.4]])
    union = union_boxes(box1, box2)
    torch.testing.assert_close(union, torch.tensor([[0.1, 0.0, 0.9, 0.6]]))
    torch.testing.assert_close(relative_box(box1, union), torch.tensor([[0.0, 1 / 3, 0.5, 1.0]]))
    torch.testing.assert_close(relative_box(box2, union), torch.tensor([[0.25, 0.0, 1.0, 2 / 3]]))


def test_concept_map_follows_the_crop_and_the_flip():
    """Reference: concept 0 on the left half, 1 on the right half (4×4 cells)."""
    assign = torch.tensor([[0, 0, 1, 1]] * 4)[None]
    left = concept_map(assign, 2, torch.tensor([[0.0, 0.0, 0.5, 1.0]]), torch.tensor([False]), 2)
    assert left.tolist() == [[0, 0, 0, 0]]
    middle = concept_map(assign, 2, torch.tensor([[0.25, 0.0, 0.75, 1.0]]), torch.tensor([False]), 2)
    assert middle.tolist() == [[0, 1, 0, 1]]  # row-major 2×2: left column 0, right column 1
    mirrored = concept_map(assign, 2, torch.tensor([[0.25, 0.0, 0.75, 1.0]]), torch.tensor([True]), 2)
    assert mirrored.tolist() == [[1, 0, 1, 0]]
    majority = concept_map(assign, 2, torch.tensor([[0.0, 0.0, 0.7, 1.0]]), torch.tensor([False]), 1)
    assert majority.tolist() == [[0]]  # 0.5 of the cell is concept 0, 0.2 is concept 1


def test_prototypes_pair_only_concepts_present_in_both_views():
    fq = torch.tensor([[[1.0, 3.0, 5.0, 7.0], [0.0, 2.0, 4.0, 6.0]]])  # (B=1, C=2, N=4)
    fk = torch.tensor([[[10.0, 20.0, 30.0, 40.0], [1.0, 1.0, 1.0, 1.0]]])
    map_q = torch.tensor([[0, 0, 1, 2]])
    map_k = torch.tensor([[1, 1, 1, 0]])  # concept 2 is only in the query view: no pair
    pq, pk, image = paired_prototypes(fq, fk, map_q, map_k, 3)
    torch.testing.assert_close(pq, torch.tensor([[2.0, 1.0], [5.0, 4.0]]))  # concept 0, concept 1
    torch.testing.assert_close(pk, torch.tensor([[40.0, 1.0], [20.0, 1.0]]))
    assert image.tolist() == [0, 0]


def test_cosine_kmeans_groups_directions():
    torch.manual_seed(0)
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    x = torch.stack([a * 2, b, a * 0.5, b * 3, a + 0.01 * b, b + 0.01 * a])[None]
    assign = cosine_kmeans(x, 2, iters=10)[0]
    assert assign[0] == assign[2] == assign[4] and assign[1] == assign[3] == assign[5] and assign[0] != assign[1]


def test_warmup_trains_the_instance_loss_only():
    torch.manual_seed(0)
    method = make(total_steps=10)  # warm-up: step 0 only
    views = method.make_views(random_images(4, 64), torch.arange(4), torch.Generator().manual_seed(0))
    assert isinstance(views, ReferenceViews) and views.reference.shape == views.x1.shape
    loss, logs = method.training_step(views, 0)
    assert "loss_concept" not in logs and loss.item() == pytest.approx(logs["loss_instance"].item())
    assert int(method.concept_queue.ptr) == 0
    loss, logs = method.training_step(views, 1)
    assert "loss_concept" in logs and loss.item() == pytest.approx(logs["loss_concept"].item())  # weight 1.0


def test_concept_loss_is_infonce_over_paired_prototypes():
    torch.manual_seed(0)
    method = make("concl:hidden_dim=64,warmup=0.0,shuffle_bn=false,num_concepts=3", pool_size=32)
    views = method.make_views(random_images(4, 64), torch.arange(4) + 10, torch.Generator().manual_seed(0))
    queue = method.concept_queue.keys.clone()
    method.concept_queue.ids[:3] = 11  # stale prototypes of image 11: excluded for image 11's queries
    state = torch.get_rng_state()
    loss, logs = method.training_step(views, 0)
    torch.set_rng_state(state)  # the same k-means initialisation
    with torch.no_grad():
        map_q, map_k = method.concept_maps(views, 2)
        fq, fk = method.backbone(views.x1)[-1], method.target_backbone(views.x2)[-1]
        pq, pk, image = paired_prototypes(fq.flatten(2), fk.flatten(2), map_q, map_k, 3)
        q = F.normalize(method.projector(pq), dim=1)
        k = F.normalize(method.target_projector(pk), dim=1)
    expected = []
    for i in range(q.shape[0]):
        negatives = queue[3:] if image[i] == 1 else queue
        logits = torch.cat([(q[i] @ k[i])[None], negatives @ q[i]]) / 0.2
        expected.append(-torch.log_softmax(logits, dim=0)[0])
    assert logs["concept_pairs"].item() == q.shape[0] > 0
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-4)
    assert int(method.concept_queue.ptr) == 3 * 4  # num_concepts·B prototypes enqueued (padded if fewer)
    assert set(method.concept_queue.ids[:12].tolist()) <= {10, 11, 12, 13}


def test_key_maps_come_back_in_batch_order_under_shuffle_bn():
    method = make().eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    k, fk = method.key_forward(x)
    with torch.no_grad():
        torch.testing.assert_close(fk, method.target_backbone(x)[-1], rtol=1e-4, atol=1e-5)
