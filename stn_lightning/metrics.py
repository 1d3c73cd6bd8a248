"""Where the transformers look: co-localisation of several objects, a penalty on overlapping regions and a reward
for regions that cover the image's content.

Regions are the closed polygons that ``SpatialTransformer.outline`` returns, (B, K, M, 2) points (x, y) in input
pixels whose last point repeats the first; object boxes are (B, D, 4) as x0, y0, x1, y1 in the same pixels (as
the MultiMNIST validation and test batches carry them).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "CoLocalization",
    "colocalized",
    "content_coverage",
    "overlap_penalty",
    "points_in_boxes",
    "points_in_polygons",
    "region_centres",
    "region_iou",
]


def region_centres(regions: Tensor) -> Tensor:
    """Centres (B, K, 2) of closed polygons (B, K, M, 2): the mean of their vertices, the closing one left out.

    For the affine families, whose outline samples the output square symmetrically, this is exactly where the
    centre of the output lands; for projective and thin-plate warps it is the mean of the outline.
    """
    return regions[..., :-1, :].mean(-2)


def points_in_boxes(points: Tensor, boxes: Tensor) -> Tensor:
    """Whether each point lies in each box (edges included): points (B, K, 2), boxes (B, D, 4) -> (B, K, D) bool.

    A box with a NaN coordinate (an object that is absent) contains no point: every comparison with NaN is False.
    """
    p = points[:, :, None, :]
    b = boxes[:, None, :, :]
    return (p[..., 0] >= b[..., 0]) & (p[..., 0] <= b[..., 2]) & (p[..., 1] >= b[..., 1]) & (p[..., 1] <= b[..., 3])


def points_in_polygons(points: Tensor, polygons: Tensor) -> Tensor:
    """Whether points lie inside closed polygons, by the even-odd crossing rule (any simple polygon).

    Args:
        points: (B, K, N, 2).
        polygons: (B, K, M, 2), closed (the last vertex repeats the first).

    Returns:
        (B, K, N) bool. Points exactly on an edge may fall either way.
    """
    a = polygons[..., :-1, :][:, :, None]  # (B, K, 1, M - 1, 2): edge starts
    b = polygons[..., 1:, :][:, :, None]  # edge ends
    p = points[:, :, :, None]  # (B, K, N, 1, 2)
    # The edge straddles the horizontal line through p, and meets it to the right of p.
    straddles = (a[..., 1] > p[..., 1]) != (b[..., 1] > p[..., 1])
    dy = b[..., 1] - a[..., 1]
    t = (p[..., 1] - a[..., 1]) / torch.where(dy == 0, torch.ones_like(dy), dy)
    crosses = straddles & (p[..., 0] < a[..., 0] + t * (b[..., 0] - a[..., 0]))
    return crosses.sum(-1) % 2 == 1


def colocalized(hits: Tensor, present: Tensor | None = None) -> Tensor:
    """Whether distinct transformers sit on distinct objects, min(K, D) of them, in each image.

    Args:
        hits: (B, K, D) bool, transformer k's centre lies on object d.
        present: (B, D) bool, which of the D objects the image holds (the others are not objects to find: images
            with fewer objects than D pad their boxes); None when all are.

    Returns:
        (B,) bool: there is a one-to-one pairing of min(K, n) transformers with min(K, n) of the image's n present
        objects along hits. With K <= n every transformer is on its own object; with K > n every object has its own
        transformer, the spare ones may be anywhere; an image without objects counts as co-localised.
    """
    b, k, d = hits.shape
    if present is None:
        present = torch.ones(b, d, dtype=torch.bool, device=hits.device)
    hits = hits & present[:, None, :]
    need = present.sum(1).clamp(max=k)
    return _largest_pairing(hits) >= need


def _largest_pairing(hits: Tensor) -> Tensor:
    # The size (B,) of the largest one-to-one pairing of rows with columns along hits (B, K, D): the most hits along
    # any injective assignment of the fewer side to the other (any pairing extends to such an assignment).
    if hits.shape[1] > hits.shape[2]:
        hits = hits.transpose(1, 2)
    b, k, d = hits.shape
    best = torch.zeros(b, dtype=torch.long, device=hits.device)
    rows = torch.arange(k, device=hits.device)
    # K <= D <= 5 in practice: at most 120 injective assignments of transformers to objects.
    for assignment in itertools.permutations(range(d), k):
        best = torch.maximum(best, hits[:, rows, torch.tensor(assignment, device=hits.device)].sum(-1))
    return best


class CoLocalization(Metric):
    """How the K transformers' regions fall on the D objects of each image, accumulated over batches.

    ``compute`` returns, as fractions of the images seen:

    * ``coloc``: co-localisation, the images in which the transformers' centres fall on min(K, D) different
      objects, each on its own (:func:`colocalized`; a centre is on an object when it lies in the object's box).
      With K < D every transformer must be on a different object; with K > D every object must have a
      transformer of its own, the spare ones may be anywhere. Boxes with NaN coordinates are objects the image does
      not hold (scenes of fewer objects than D, :class:`~stn_lightning.data.DigitScenes`): D is then, per image, the
      number of its other boxes, and an image without any counts as co-localised.
    * ``hit_k``: the images in which transformer k's centre falls on some object.
    * ``contains_k``: the images in which transformer k's region (its outline polygon) contains the whole box of
      at least one object (its four corners inside the polygon: exact for the convex regions of affine and
      projective warps).

    States are sums with ``dist_reduce_fx="sum"``, so the result is the same on one or many processes.

    Args:
        num_transformers: K.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    coloc: Tensor
    hit: Tensor
    contains: Tensor
    total: Tensor

    def __init__(self, num_transformers: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if num_transformers < 1:
            raise ValueError(f"expected num_transformers >= 1, got {num_transformers}")
        self.num_transformers = num_transformers
        self.add_state("coloc", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("hit", torch.zeros(num_transformers, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("contains", torch.zeros(num_transformers, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, regions: Tensor, boxes: Tensor) -> None:
        """Add a batch.

        Args:
            regions: (B, K, M, 2) closed polygons in input pixels (``SpatialTransformer.outline``).
            boxes: (B, D, 4) object boxes x0, y0, x1, y1 in the same pixels; a row with a NaN is no object.
        """
        if regions.dim() != 4 or regions.shape[1] != self.num_transformers or regions.shape[-1] != 2:
            raise ValueError(f"expected regions (B, {self.num_transformers}, M, 2), got {tuple(regions.shape)}")
        if boxes.dim() != 3 or boxes.shape[0] != regions.shape[0] or boxes.shape[-1] != 4:
            raise ValueError(f"expected boxes ({regions.shape[0]}, D, 4), got {tuple(boxes.shape)}")
        regions, boxes = regions.detach().float(), boxes.detach().float().to(regions.device)
        hits = points_in_boxes(region_centres(regions), boxes)  # (B, K, D)
        b, d = boxes.shape[:2]
        corners = boxes[..., [0, 1, 2, 1, 2, 3, 0, 3]].view(b, 1, d * 4, 2).expand(-1, self.num_transformers, -1, -1)
        inside = points_in_polygons(corners, regions).view(b, self.num_transformers, d, 4).all(-1)  # (B, K, D)
        self.coloc += colocalized(hits, present=~boxes.isnan().any(-1)).sum()
        self.hit += hits.any(-1).sum(0)
        self.contains += inside.any(-1).sum(0)
        self.total += b

    def compute(self) -> dict[str, Tensor]:
        """``coloc``, ``hit_k`` and ``contains_k`` for k in range(K), fractions in [0, 1]."""
        n = self.total.clamp(min=1).float()
        out = {"coloc": self.coloc.float() / n}
        out.update({f"hit_{k}": self.hit[k].float() / n for k in range(self.num_transformers)})
        out.update({f"contains_{k}": self.contains[k].float() / n for k in range(self.num_transformers)})
        return out


def overlap_penalty(regions: Tensor, jitter: float = 1e-3) -> Tensor:
    """How much the K transformers read the same place: the IoU of their regions' axis-aligned boxes, averaged.

    Each region is replaced by the axis-aligned box around its polygon; the penalty is the intersection over
    union of every pair of these boxes, averaged over the K (K - 1) / 2 pairs and the batch. It is 0 for K = 1
    and for regions that do not overlap, 1 when all regions coincide, and differentiable in the polygons (so in
    the warp parameters): its gradient moves overlapping regions apart (and, as any overlap measure, it also
    gains from shrinking them; the classification loss keeps them on the objects).

    Any penalty that treats the transformers alike has a zero gradient when their regions coincide exactly,
    which is where K transformers started at the identity begin. So before the comparison box k is moved by
    ``jitter`` times its width and height towards the centre of the k-th window of the tiled layout
    (``tiled_windows``: a near-square grid, row major, in normalised coordinates), a fixed and almost invisible
    offset: coinciding regions then get a gradient that spreads them apart along that layout, and the touching
    windows of ``init="tiled"`` are nudged apart rather than into each other.

    Used alone it can be lowered by moving regions out of the image, where they read only padding. In a
    40-step check on MultiMNIST (batch 32, K = 2 ``Attention(scale_range=(0.2, 1.0))`` transformers started at
    the identity, whose scale then sits in the saturated end of its sigmoid and cannot shrink; translations
    unbounded), weight 1 at the base localisation rate moved both regions entirely off the canvas (validation
    ``stn_outside`` 1.0); weight 0.1 left 21 % and weight 1 at a tenth of the rate 23 % of the sampled points
    outside. Pair it with ``init="tiled"`` (the same check kept the overlap at 0 and every point inside), bounded
    translations, or a scale range whose interior holds the start.

    Args:
        regions: (B, K, M, 2) polygons (``SpatialTransformer.outline``), any units with equal x and y scales.
        jitter: the fixed relative offset that separates coinciding regions; 0 turns it off.

    Returns:
        A scalar tensor in [0, 1].
    """
    b, k = regions.shape[:2]
    if k < 2:
        return regions.sum() * 0.0
    lo, hi = regions.amin(-2), regions.amax(-2)  # (B, K, 2)
    if jitter:
        cols = math.ceil(math.sqrt(k))
        rows = math.ceil(k / cols)
        idx = torch.arange(k, device=regions.device)
        # Centre of tile k of a rows x cols grid over [-1, 1]^2, as tiled_windows lays them out.
        tiles = torch.stack([(2 * (idx % cols) + 1) / cols - 1, (2 * (idx // cols) + 1) / rows - 1], -1)
        shift = jitter * (hi - lo).detach() * tiles.to(regions.dtype)
        lo, hi = lo + shift, hi + shift
    iou = _box_iou(lo, hi)
    i, j = torch.triu_indices(k, k, offset=1, device=regions.device)
    return iou[:, i, j].mean()


def region_iou(regions: Tensor) -> Tensor:
    """The intersection over union of every pair of the K regions' axis-aligned boxes: (B, K, M, 2) -> (B, K, K)."""
    return _box_iou(regions.amin(-2), regions.amax(-2))


def _box_iou(lo: Tensor, hi: Tensor) -> Tensor:
    # Boxes (B, K, 2) lower and upper corners -> pairwise IoU (B, K, K).
    inter = (torch.minimum(hi[:, :, None], hi[:, None]) - torch.maximum(lo[:, :, None], lo[:, None])).clamp(min=0)
    inter_area = inter.prod(-1)
    area = (hi - lo).clamp(min=0).prod(-1)  # (B, K)
    union = area[:, :, None] + area[:, None] - inter_area
    return inter_area / union.clamp(min=1e-12)


def content_coverage(
    regions: Tensor,
    images: Tensor,
    background: float = 0.0,
    softness: float = 0.05,
    pool: int = 2,
    once: bool = False,
) -> Tensor:
    """The share of the image's content that the union of the K regions covers, a soft and differentiable count.

    Content is how far each pixel is from the background, ``|x - background|`` summed over channels (average-pooled
    by ``pool``), so on digits it is the ink. Each region is replaced by its axis-aligned box, and the box by a soft
    indicator (a product of sigmoids of the distance to its edges, ``softness`` times the image's size wide), so
    content just outside a region already pulls its edge. The union of the K indicators is
    ``1 - prod_k (1 - w_k)``: a second region on the same object adds nothing, which is what sends K regions to K
    different objects.

    It is a prior for objects on a plain background that does not wait for the classifier: it tells a localiser
    where the content is from the first step. It grows with the regions' size, so pair it with a bounded scale (an
    ``Attention`` scale range around the objects' size).

    With ``once``, only content covered by exactly one region counts: ``sum_k w_k prod_{j != k} (1 - w_j)`` (the
    indicators read as independent chances). The union gives a region no gradient on content that another region
    already covers, so nothing moves a spare region off an object that another one reads; here a second region on the
    same content lowers the count, and its gradient pushes the spare region off until it reads background.

    Args:
        regions: (B, K, M, 2) polygons (``SpatialTransformer.outline``) in input pixels.
        images: (B, C, H, W), the transformer's input.
        background: the value of an empty pixel.
        softness: width of the indicators' edges as a fraction of the image's larger side.
        pool: average-pooling of the content map (cheaper; 1 keeps every pixel).
        once: count the content inside exactly one region instead of inside any.

    Returns:
        (B,) shares in [0, 1] (1: every bit of content inside some region, or exactly one with ``once``; an image
        without content gives 0).
    """
    content = (images.float() - background).abs().sum(1, keepdim=True)
    if pool > 1:
        content = F.avg_pool2d(content, pool, ceil_mode=True)
    content = content[:, 0]  # (B, h, w)
    h, w = content.shape[-2:]
    height, width = images.shape[-2:]
    # Pixel centres of the pooled map in input pixels.
    ys = (torch.arange(h, device=images.device, dtype=torch.float32) + 0.5) * (height / h)
    xs = (torch.arange(w, device=images.device, dtype=torch.float32) + 0.5) * (width / w)
    lo, hi = regions.float().amin(-2), regions.float().amax(-2)  # (B, K, 2)
    tau = softness * max(height, width)
    wx = torch.sigmoid((xs - lo[..., 0:1]) / tau) * torch.sigmoid((hi[..., 0:1] - xs) / tau)  # (B, K, w)
    wy = torch.sigmoid((ys - lo[..., 1:2]) / tau) * torch.sigmoid((hi[..., 1:2] - ys) / tau)  # (B, K, h)
    inside = wy[..., :, None] * wx[..., None, :]  # (B, K, h, w)
    if once:
        # Exactly one of K: each region's indicator times the others' complements (a product over K - 1 factors per
        # region, without a division by 1 - w_k, which is 0 deep inside a region).
        outside = 1 - inside
        k = inside.shape[1]
        others = [torch.cat([outside[:, :i], outside[:, i + 1 :]], 1).prod(1) for i in range(k)]
        covered = (inside * torch.stack(others, 1)).sum(1)  # (B, h, w)
    else:
        covered = 1 - (1 - inside).prod(1)  # (B, h, w)
    return (content * covered).flatten(1).sum(1) / content.flatten(1).sum(1).clamp(min=1e-12)
