"""Which feature standardisation should attention MIL use by default? Measured side by side in one run.

Candidates, each applied through ``AttentionMIL.set_standardization`` (or not at all) before training:

* ``raw``: no standardisation (the paper's set-up);
* ``z 1%``, ``z 10%``, ``z 30%``: per-dimension z-score with the std clamped below at 1% (today's default,
  ``STD_FLOOR_FRACTION``), 10% or 30% of the median positive per-dimension std of the training patches;
* ``global``: centred per dimension, every dimension divided by one common scale, the RMS of the
  per-dimension stds (so the centred inputs have mean per-dimension variance 1, as z-scored ones do). It is
  passed as a constant std vector: the model expresses it today.

Bag sets, built here: half the bags positive, 1-3 witnesses per positive bag; 100 training (digits: 50),
50 validation and 200 test bags; training and validation bags draw from one instance pool, test bags from a
disjoint one. Planted strengths are set so that the best candidate lands near 0.85-0.95, away from 0.5 and 1.

* ``digits``: scikit-learn's 8x8 digits as MNIST-bags (Ilse et al.): bag sizes ~ N(10, 2), a bag is positive
  when it holds a 9, raw pixels (64-d, many border pixels almost always 0); images split 50/50 into pools.
* ``cnn-tissue``: DenseNet121 (ImageNet) features of 224 px patches of the real slide CMU-1-Small-Region (20x,
  stride 56), bag sizes ~ N(24, 5); witnesses are patches of one tissue type, the darkest (nuclei-dense) of five
  k-means clusters of the patches' mean CIELAB colour, so the witness type is defined by pixels, not by features.
  Negative bags hold only other patches. The pools are 60% / 40% of the slide's 448 px blocks (patches near a block
  border still overlap patches of the next block).
* ``cnn-planted``: the same features and pools, every patch a possible instance; witnesses move along one
  training patch's deviation from the mean feature (a direction with the features' own geometry, neither
  isotropic in raw space nor in z-space) by ``PLANT_STRENGTH`` times the typical deviation norm.
* ``heavy``: 48-d synthetic: Student-t (df 3) and log-normal dims with scales spread over two decades,
  near-constant dims (tiny noise) and rarely firing dims (mostly 0, occasional spikes, like dead ReLU
  channels); witnesses are shifted in four t dims and four log-normal dims; fresh instances for every bag.

Every candidate trains with the project's ``mil.train.fit`` (Adam, lr 1e-3, 20 epochs, one bag per step, best
validation AUC kept) from the same initialisation on the same bags for a given seed; test AUC per run. Prints
mean +- sd test AUC per candidate and set, each candidate's worst gap to the best mean of a set, the per-set
winner, and the recommended default: the candidate with the smallest worst gap.

The slide's tiles, features and patch colours are cached (``--cache``) so a re-run skips extraction; without
the slide or the DenseNet weights the two CNN sets are skipped with a message.

The full run (16 seeds per set) takes about 10-15 minutes on 2 idle cores, ``--quick`` about 1-2 minutes.
Gaps smaller than about twice their paired standard error (second table) are within seed noise.

Run: ``.venv/bin/python benchmarks/bench_standardize.py [--quick] [--seeds N] [--jobs 2]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # fit draws a progress bar per run; hundreds of them bury the table

import argparse
import multiprocessing as mp
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from histotransfer.features import extract_features, read_feature_file
from histotransfer.mil.bags import feature_stats
from histotransfer.mil.models import STD_FLOOR_FRACTION, AttentionMIL
from histotransfer.mil.train import fit, predict, seeded
from histotransfer.patches import PatchReader, read_patch_file, tile_slides
from histotransfer.slide import open_slide

SHARED = Path(__file__).resolve().parents[2] / "shared"
CMU = SHARED / "data" / "CMU-1-Small-Region.svs"
DENSENET = SHARED / "weights" / "densenet121_imagenet_from_keras.safetensors"

EPOCHS, LR = 20, 1e-3  # the project's training defaults
N_TRAIN, N_VAL, N_TEST = 100, 50, 200  # bags per split
DIGIT_TRAIN_BAGS = 50  # Ilse et al.'s smallest MNIST-bags training set: with 100 the 8x8 digits saturate
WITNESSES = (1, 3)  # witnesses per positive bag, inclusive range
TARGET_DIGIT = 9
CNN_BAG_SIZE = (24.0, 5.0)  # mean, sd of the CNN bags' sizes
SMALL_BAG_SIZE = (10.0, 2.0)  # digits and heavy-tailed bags (Ilse et al.'s MNIST-bags)
PLANT_STRENGTH = 0.35
N_COLOUR_CLUSTERS = 5
HEAVY_SHIFT = 1.5  # witness shift of the heavy-tailed set, in units of each signal dim's scale
SETS = ("digits", "cnn-tissue", "cnn-planted", "heavy")
CANDIDATES = ("raw", "z 1%", "z 10%", "z 30%", "global")
FLOOR_FRACTIONS = {"z 1%": STD_FLOOR_FRACTION, "z 10%": 0.10, "z 30%": 0.30}

Split = tuple[list[torch.Tensor], np.ndarray]


@dataclass
class BagSplits:
    train: Split
    val: Split
    test: Split


@dataclass
class Layout:
    """Labels and witness masks of a split's bags (a mask's length is the bag size; all False in negatives)."""

    labels: np.ndarray
    witness: list[np.ndarray]


@dataclass
class PatchFeatures:
    """Real CNN features of the slide's patches with what the CNN sets need to draw bags from them."""

    features: np.ndarray  # (N, D) float32
    block: np.ndarray  # (N,) spatial block id of each patch (2x2 patch footprints)
    witness_type: np.ndarray  # (N,) bool: patch of the darkest colour cluster


# ---- candidates ------------------------------------------------------------------------------------------


def apply_candidate(model: AttentionMIL, name: str, train_bags: list[torch.Tensor]) -> None:
    """Set ``model``'s standardisation to candidate ``name`` from the training bags' patches."""
    if name == "raw":
        return
    mean, std = feature_stats(train_bags)
    if name == "global":
        model.set_standardization(mean, np.full_like(std, np.sqrt(np.mean(std**2))))
        return
    positive = std[std > 0]
    model.set_standardization(mean, std, floor=FLOOR_FRACTIONS[name] * float(np.median(positive)))


def test_auc(candidate: str, bags: BagSplits, seed: int) -> float:
    """Train one model with the project's ``fit`` under ``candidate``; its test AUC."""
    with seeded(seed):
        model = AttentionMIL(int(bags.train[0][0].shape[1]))
        apply_candidate(model, candidate, bags.train[0])
        result = fit(model, bags.train, bags.val, EPOCHS, LR, seed)
    model.load_state_dict(result.state)
    probs, _ = predict(model, bags.test[0])
    return float(roc_auc_score(bags.test[1], probs[:, 1]))


# ---- bag layouts and pools -------------------------------------------------------------------------------


def layout(n_bags: int, size: tuple[float, float], rng: np.random.Generator) -> Layout:
    """Half the bags positive, sizes ~ N(mean, sd) (at least 4), 1-3 witnesses at random places."""
    labels = rng.permutation(np.arange(n_bags) % 2)
    witness = []
    for label in labels:
        n = max(4, round(rng.normal(*size)))
        mask = np.zeros(n, bool)
        if label:
            mask[rng.choice(n, int(rng.integers(WITNESSES[0], WITNESSES[1] + 1)), replace=False)] = True
        witness.append(mask)
    return Layout(labels, witness)


def draw_from_pools(
    lay: Layout, features: np.ndarray, witness_pool: np.ndarray, other_pool: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each bag's rows of ``features``: witnesses from ``witness_pool``, the rest from ``other_pool``."""
    bags = []
    for mask in lay.witness:
        idx = rng.choice(other_pool, len(mask))
        idx[mask] = rng.choice(witness_pool, int(mask.sum()))
        bags.append(features[idx])
    return bags


def as_split(bags: list[np.ndarray], lay: Layout) -> Split:
    """Bags as the float32 tensors ``fit`` and ``predict`` take, with their labels."""
    return [torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)) for b in bags], lay.labels


def pooled_splits(
    make: Callable[[Layout, bool], list[np.ndarray]],
    size: tuple[float, float],
    rng: np.random.Generator,
    n_test: int,
    n_train: int = N_TRAIN,
) -> BagSplits:
    """Train/val bags from ``make(layout, False)`` (training pool), test bags from ``make(layout, True)``."""
    lays = [layout(n, size, rng) for n in (n_train, N_VAL, n_test)]
    return BagSplits(*(as_split(make(lay, test), lay) for lay, test in zip(lays, (False, False, True))))


# ---- bag sets --------------------------------------------------------------------------------------------


def digit_bags(seed: int, n_test: int) -> BagSplits:
    """MNIST-bags from the 8x8 digits; images split 50/50 (stratified) into training and test pools."""
    rng = np.random.default_rng(seed)
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.5, stratify=y, random_state=seed)

    def make(lay: Layout, test: bool) -> list[np.ndarray]:
        pool = test_idx if test else train_idx
        return draw_from_pools(lay, x, pool[y[pool] == TARGET_DIGIT], pool[y[pool] != TARGET_DIGIT], rng)

    return pooled_splits(make, SMALL_BAG_SIZE, rng, n_test, DIGIT_TRAIN_BAGS)


def block_pools(patches: PatchFeatures, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Patch indices of the training and test pools: 60% / 40% of the spatial blocks, redrawn until each
    pool holds at least five witness-type patches."""
    blocks = np.unique(patches.block)
    while True:
        train_blocks = rng.choice(blocks, round(0.6 * len(blocks)), replace=False)
        in_train = np.isin(patches.block, train_blocks)
        if min((patches.witness_type & in_train).sum(), (patches.witness_type & ~in_train).sum()) >= 5:
            return np.flatnonzero(in_train), np.flatnonzero(~in_train)


def cnn_tissue_bags(patches: PatchFeatures, seed: int, n_test: int) -> BagSplits:
    """Witnesses: patches of the darkest colour cluster; every other patch: patches of the other clusters."""
    rng = np.random.default_rng(seed)
    pools = block_pools(patches, rng)

    def make(lay: Layout, test: bool) -> list[np.ndarray]:
        pool = pools[test]
        wt = patches.witness_type[pool]
        return draw_from_pools(lay, patches.features, pool[wt], pool[~wt], rng)

    return pooled_splits(make, CNN_BAG_SIZE, rng, n_test)


def cnn_planted_bags(patches: PatchFeatures, seed: int, n_test: int) -> BagSplits:
    """Any patch is an instance; witnesses move by ``PLANT_STRENGTH`` times the typical deviation norm along
    one training patch's deviation from the mean feature."""
    rng = np.random.default_rng(seed)
    pools = block_pools(patches, rng)
    x = patches.features.astype(np.float64)
    train = x[pools[0]]
    deviation = x[rng.choice(pools[0])] - train.mean(0)
    # Scaled to the typical deviation norm (root of the total variance), so every seed plants as strongly.
    direction = deviation * np.sqrt(train.var(0).sum()) / np.linalg.norm(deviation)

    def make(lay: Layout, test: bool) -> list[np.ndarray]:
        pool = pools[test]
        bags = draw_from_pools(lay, x, pool, pool, rng)
        return [b + PLANT_STRENGTH * mask[:, None] * direction for b, mask in zip(bags, lay.witness)]

    return pooled_splits(make, CNN_BAG_SIZE, rng, n_test)


def heavy_instances(witness: np.ndarray, scales: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Instances (n, 48): dims 0-15 Student-t (df 3), 16-31 log-normal, 32-39 near-constant (noise 1e-3 of
    the median scale), 40-47 rarely firing (0 but with probability 0.5% a spike of |t| times the median
    scale); every dim times its scale. Witnesses: +HEAVY_SHIFT in dims 0-3 and in log-space in dims 16-19."""
    n = len(witness)
    t = rng.standard_t(3, (n, 16))
    log_normal = rng.standard_normal((n, 16))
    t[witness, :4] += HEAVY_SHIFT
    log_normal[witness, :4] += HEAVY_SHIFT
    median = float(np.median(scales))
    near_constant = 1e-3 * median * rng.standard_normal((n, 8)) / scales[32:40]
    firing = (rng.random((n, 8)) < 0.005) * np.abs(rng.standard_t(3, (n, 8))) * median / scales[40:]
    return np.hstack([t, np.exp(log_normal), near_constant, firing]) * scales


def heavy_bags(seed: int, n_test: int) -> BagSplits:
    """Heavy-tailed synthetic bags; per-dim scales log-uniform over [0.1, 10] (new instances for every bag)."""
    rng = np.random.default_rng(seed)
    scales = 10 ** rng.uniform(-1, 1, 48)

    def make(lay: Layout, test: bool) -> list[np.ndarray]:
        return [heavy_instances(mask, scales, rng) for mask in lay.witness]

    return pooled_splits(make, SMALL_BAG_SIZE, rng, n_test)


# ---- the slide's features (cached) -----------------------------------------------------------------------


def slide_colours(slide: Path, patch_file: Path, coords: np.ndarray) -> np.ndarray:
    """Mean CIELAB colour (N, 3) of the patches at ``coords``."""
    spec = read_patch_file(patch_file).spec
    with open_slide(slide) as s, PatchReader(s, spec) as reader:
        return np.stack([cv2.cvtColor(reader.read(x, y), cv2.COLOR_RGB2LAB).reshape(-1, 3).mean(0) for x, y in coords])


def prepare_patch_features(slide: Path, weights: Path, cache: Path) -> Path:
    """Tile ``slide`` (20x, 224 px, stride 56), extract DenseNet121 features and the patches' colours into
    ``cache`` (skipped when already there); returns the .npz holding features, coords, colours, footprint."""
    out = cache / "densenet121_patches.npz"
    if out.is_file():
        return out
    tile_slides([slide], cache / "tiles", magnification=20, patch_size=224, stride=56)
    folder = extract_features(cache / "tiles" / "patches", cache / "tiles", "densenet121", str(weights))
    bag = read_feature_file(next(folder.glob("*.h5")))
    patch_file = cache / "tiles" / "patches" / f"{bag.slide_id}.h5"
    footprint = int(read_patch_file(patch_file).spec.patch_size_level0)
    colours = slide_colours(slide, patch_file, bag.coords)
    np.savez(out, features=bag.features, coords=bag.coords, colours=colours, footprint=footprint)
    return out


def load_patch_features(path: Path) -> PatchFeatures:
    """The cached features with block ids and the darkest (lowest CIELAB L) colour cluster as witness type."""
    data = np.load(path)
    side = 2 * int(data["footprint"])
    cells = data["coords"] // side
    block = cells[:, 0] * (cells[:, 1].max() + 1) + cells[:, 1]
    km = KMeans(N_COLOUR_CLUSTERS, n_init=10, random_state=0).fit(data["colours"])
    darkest = int(np.argmin(km.cluster_centers_[:, 0]))
    return PatchFeatures(data["features"], block, km.labels_ == darkest)


# ---- running ---------------------------------------------------------------------------------------------

_PATCHES: PatchFeatures | None = None


def init_worker(npz: Path | None) -> None:
    """One torch thread per worker process (tiny models: processes scale, threads do not); load features."""
    global _PATCHES
    torch.set_num_threads(1)
    _PATCHES = load_patch_features(npz) if npz is not None else None


def make_bags(bag_set: str, seed: int, n_test: int) -> BagSplits:
    """One seed's train/val/test bags of ``bag_set``."""
    if bag_set == "digits":
        return digit_bags(seed, n_test)
    if bag_set == "heavy":
        return heavy_bags(seed, n_test)
    assert _PATCHES is not None
    return (cnn_tissue_bags if bag_set == "cnn-tissue" else cnn_planted_bags)(_PATCHES, seed, n_test)


def run_task(bag_set: str, seed: int, n_test: int) -> tuple[str, int, dict[str, float], float]:
    """Every candidate on one seed's bags of ``bag_set``: test AUCs and the seconds taken."""
    t0 = time.perf_counter()
    bags = make_bags(bag_set, seed, n_test)
    aucs = {c: test_auc(c, bags, seed) for c in CANDIDATES}
    return bag_set, seed, aucs, time.perf_counter() - t0


def print_table(results: dict[str, np.ndarray]) -> None:
    """Mean +- sd per candidate and set, worst gap to each set's best mean, winners and the recommendation."""
    sets = list(results)
    means = {s: results[s].mean(axis=1) for s in sets}
    gaps = np.stack([means[s].max() - means[s] for s in sets], axis=1)  # (candidates, sets)
    width = 15
    print("\ntest AUC, mean +- sd over seeds (seeds: " + ", ".join(f"{s} {results[s].shape[1]}" for s in sets) + ")")
    print(f"{'candidate':<10}" + "".join(f"{s:>{width}}" for s in sets) + f"{'worst gap':>{width}}")
    for i, c in enumerate(CANDIDATES):
        cells = "".join(f"{results[s][i].mean():>8.3f} +-{results[s][i].std(ddof=1):.3f}" for s in sets)
        worst = int(np.argmax(gaps[i]))
        print(f"{c:<10}{cells}{gaps[i, worst]:>9.3f} ({sets[worst]})")
    print("\npaired gap to the set's best candidate, mean (standard error over seeds):")
    for i, c in enumerate(CANDIDATES):
        cells = []
        for s in sets:
            diff = results[s][int(np.argmax(means[s]))] - results[s][i]
            cells.append(f"{diff.mean():>7.3f} ({diff.std(ddof=1) / np.sqrt(len(diff)):.3f})")
        print(f"{c:<10}" + "".join(f"{x:>{width}}" for x in cells))
    print("\nper-set winner: " + ", ".join(f"{s}: {CANDIDATES[int(np.argmax(means[s]))]}" for s in sets))
    best = int(np.argmin(gaps.max(axis=1)))
    print(f"recommended default (smallest worst gap): {CANDIDATES[best]} (worst gap {gaps[best].max():.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 seeds per set and 100 test bags (about 1-2 minutes): a smoke run, too few seeds "
        "for a stable recommendation",
    )
    ap.add_argument("--seeds", type=int, default=None, help="seeds per set (default 16, --quick 2)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    ap.add_argument("--slide", type=Path, default=CMU)
    ap.add_argument("--weights", type=Path, default=DENSENET, help="DenseNet121 ImageNet weights file")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "histotransfer-bench-standardize",
        help="folder for the slide's tiles, features and colours, reused by later runs",
    )
    args = ap.parse_args()
    n_seeds = args.seeds or (2 if args.quick else 16)
    n_test = 100 if args.quick else N_TEST
    sets = list(args.sets)
    npz = None
    if any(s.startswith("cnn") for s in sets):
        if args.slide.is_file() and args.weights.is_file():
            npz = prepare_patch_features(args.slide, args.weights, args.cache)
        else:
            print(f"skipping the CNN sets: needs {args.slide} and {args.weights}")
            sets = [s for s in sets if not s.startswith("cnn")]
    print(
        f"torch {torch.__version__}; {len(sets)} sets x {n_seeds} seeds x {len(CANDIDATES)} candidates, "
        f"{N_TRAIN}/{N_VAL}/{n_test} train/val/test bags, {EPOCHS} epochs, {args.jobs} processes",
        flush=True,
    )
    t0 = time.perf_counter()
    results = {s: np.zeros((len(CANDIDATES), n_seeds)) for s in sets}
    with ProcessPoolExecutor(args.jobs, mp.get_context("spawn"), initializer=init_worker, initargs=(npz,)) as pool:
        futures = [pool.submit(run_task, s, seed, n_test) for seed in range(n_seeds) for s in sets]
        for future in futures:
            bag_set, seed, aucs, seconds = future.result()
            results[bag_set][:, seed] = [aucs[c] for c in CANDIDATES]
            print(
                f"{bag_set:<12} seed {seed:>2}: "
                + "  ".join(f"{c} {a:.3f}" for c, a in aucs.items())
                + f"  ({seconds:.0f} s)",
                flush=True,
            )
    print_table(results)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
