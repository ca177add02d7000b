"""Do the shipped post-training recipes learn what they claim? Each effect on HELD-OUT rows, over seeds and builds.

Each shipped config (``training/configs/dpo_lora.yaml``, ``nft_lora.yaml``, ``identity_sft.yaml``) is loaded as
shipped and only scaled down (:func:`scaled_config`): the model (a tiny random model of the real architecture, two
builds from different weight seeds), the data and output paths, the image size (64x64), the number of steps, and
with it the warm-up and the learning rate, kept at the shipped ``lr x steps`` (Adam moves each weight about
``lr`` per step, so the short run moves the weights as far as the shipped run would), and fp32 (bf16 on this CPU is
4x slower). Every other key (LoRA rank, beta, omega, group size, rollout steps, inner steps, trust region, eta...)
is the shipped one. NFT's reward is the ``module:function`` plug-in ``brightness`` (the shipped OCR reward scores 0
on every image a random tiny model makes: no signal to learn from); DPO's and NFT's rows are
:mod:`firered_core.training.synthetic` colour edits, identity's are real faces (``skimage.data.lfw_subset``) pasted
into real photographs (``skimage.data``). DPO's dispreferred image is the preferred edit with a colour cast
(:func:`colour_cast`), a defect the tiny model can learn to avoid on pictures it never saw. The previous proof used
the unedited source as the dispreferred image: measured on 32 held-out pairs (build 0, 80 steps, seeds 0-2) the
accuracy then FELL to 0.43 (the 8 held-out pairs it was measured on before had shown +0.09 to +0.13: a small
held-out set hid that the preference did not generalise); on 64 training pairs it stayed at 0.51.

Training rows and held-out rows are disjoint (different block pictures; different faces and scenes); everything
reported is measured on the held-out rows only, at fixed noise draws:

- DPO: the implicit reward margin ``-beta/2 ((e_w - r_w) - (e_l - r_l))`` and the preference accuracy (margin > 0,
  ties count 1/2) over 16 held-out pairs x 4 noise draws, before (the LoRA starts at zero: margin 0, accuracy 1/2
  exactly) and after; control (``--control``): the same run on swapped preferences, measured against the true ones;
- NFT: the mean reward of 8 edits per held-out prompt by the current weights (10 Euler steps from fixed noise),
  before and after, also in units of the within-prompt reward spread before (what the group normalisation
  learns from); control: the same run rewarded by the reward's negative;
- identity: the face-embedding distance (1 - cos) between the edited face (the one-step edit
  ``x0_hat = x_t - sigma v`` at sigma 0.3 / 0.5 / 0.7, decoded) and the target's face on 16 held-out rows, after
  training with the identity term and after the same training without it (same seed, data, draws: the control).

Each effect is summarised per model build (mean, standard deviation over the seeds, their ratio) and pooled; the
bar is a ratio above 3 for every build, the seed-to-seed spread being the effect's own variation, not a standard
error of the measurement.

The embedder is planted: eigenfaces (the top principal components of the TRAINING faces' pixels), a differentiable
face descriptor known to separate these identities; nothing is downloaded. Note that the tiny models' VAE is random:
the decoded "faces" are the random decoder's rendering of the latents, so this measures whether the term moves the
embedding distance it optimises on faces it never saw, not how a real face looks.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/posttrain_effect.py --recipe dpo --control --json cells.jsonl
    PYTHONPATH=. python benchmarks/posttrain_effect.py --table cells.jsonl      # the markdown of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "training" / "configs"
RECIPES = {"dpo": "dpo_lora.yaml", "nft": "nft_lora.yaml", "identity": "identity_sft.yaml"}
STEPS = {"dpo": 40, "nft": 96, "identity": 64}  # the scaled-down run of each recipe (benchmark and tests)
SIZE = 64
TRAIN_ROWS = {"dpo": 8, "nft": 4}  # training pairs / prompts (--train-rows)
HELD_SEED = [200]  # draws the held-out rows (--held-seed: a second, fresh held-out set)
HELD_ROWS = {"dpo": 16, "nft": 4, "identity": 16}  # held-out rows each effect is measured on
CONFIG_FILES: dict[str, Path] = {}  # --config: another file for a recipe (your own recipe, proven the same way)
EVAL_STEP = 10**9
SIGMAS = (0.3, 0.5, 0.7)


def brightness(images: torch.Tensor, prompts: list[str]) -> list[float]:
    """The NFT reward plug-in of this benchmark: mean pixel value of each edit (higher is better)."""
    return images.mean(dim=(1, 2, 3)).tolist()


def brightness_negated(images: torch.Tensor, prompts: list[str]) -> list[float]:
    """The control's reward: the opposite preference."""
    return [-r for r in brightness(images, prompts)]


NFT_REWARD = "brightness"


def brightness_sign(reward: str) -> float:
    """-1 for the control's negated reward: the held-out measure is always the true reward."""
    return -1.0 if reward.endswith("_negated") else 1.0


# -- data --------------------------------------------------------------------------------------------------------------
def colour_rows(root: Path, rows: int, seed: int, rejected: bool) -> Path:
    """Synthetic colour edits; ``rejected``: each row's dispreferred image is its target with a colour cast
    (:func:`colour_cast`)."""
    from firered_core.training.synthetic import make_dataset

    root = make_dataset(root, rows=rows, seed=seed, rejected=rejected)
    for rej in root.rglob("*_rej.png") if rejected else ():
        tgt = np.asarray(Image.open(str(rej).replace("_rej.png", "_tgt.png")).convert("RGB"))
        Image.fromarray(colour_cast(tgt, seed)).save(rej)
    return root


CAST = 48  # the dispreferred edit's colour cast, in 8-bit levels


def colour_cast(arr: np.ndarray, seed: int) -> np.ndarray:
    """The target with a warm cast (red up, blue down by :data:`CAST`): a common defect of edit models' output."""
    out = arr.astype(np.int16) + np.array([CAST, 0, -CAST], dtype=np.int16)
    return np.clip(out, 0, 255).astype(np.uint8)


def lfw_faces() -> np.ndarray:
    """The 100 real face crops of ``skimage.data.lfw_subset()`` (the first 100 of its 200 are faces), 25x25 in 0..1."""
    from skimage.data import lfw_subset

    return lfw_subset()[:100].astype(np.float32)


TRAIN_FACES, HELD_FACES = range(0, 50), range(50, 100)


def scenes() -> list[np.ndarray]:
    """Real photographs shipped in scikit-image (no download)."""
    from skimage import data

    return [getattr(data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]


def face_rows(root: Path, faces: range, rows: int, seed: int) -> Path:
    """Rows whose source is a photograph crop with a real face pasted at a random place, the target the same
    picture with its colour channels rotated (the grey face stays as it is), ``faces`` its box."""
    from firered_core.training.synthetic import recolour

    rng = np.random.default_rng(seed)
    pool, photos = lfw_faces(), scenes()
    folder = root / "faces"
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        scene = np.asarray(Image.fromarray(photo[y:y + side, x:x + side]).convert("RGB").resize((SIZE, SIZE),
                                                                                               Image.LANCZOS))
        face = pool[faces[int(rng.integers(len(faces)))]]
        fs = SIZE // 2
        face_img = np.asarray(Image.fromarray((face * 255).astype(np.uint8)).resize((fs, fs), Image.LANCZOS))
        fy, fx = int(rng.integers(0, SIZE - fs + 1)), int(rng.integers(0, SIZE - fs + 1))
        src = scene.copy()
        src[fy:fy + fs, fx:fx + fs] = face_img[..., None]
        Image.fromarray(src).save(folder / f"img/{i:04d}_src.png")
        Image.fromarray(np.ascontiguousarray(recolour(src))).save(folder / f"img/{i:04d}_tgt.png")
        lines.append(json.dumps({"source_image": f"img/{i:04d}_src.png", "target_image": f"img/{i:04d}_tgt.png",
                                 "instruction": "Rotate the colours of Picture 1, keep the face",
                                 "instruction_cn": "旋转图1的颜色，保留人脸", "faces": [[fx, fy, fx + fs, fy + fs]]}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


class EigenfaceEmbedder(torch.nn.Module):
    """A planted, differentiable face embedder: grey 25x25 crop minus the mean face, projected on the top ``k``
    principal components of the training faces (eigenfaces)."""

    def __init__(self, faces: np.ndarray, k: int = 16):
        super().__init__()
        x = torch.from_numpy(faces.reshape(len(faces), -1)).double()
        mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        self.register_buffer("mean", mean.float())
        self.register_buffer("basis", vh[:k].float())

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        grey = F.interpolate(crops.mean(1, keepdim=True), size=(25, 25), mode="bilinear", align_corners=False)
        return (grey.flatten(1) - self.mean) @ self.basis.T


def planted_embedder() -> EigenfaceEmbedder:
    return EigenfaceEmbedder(lfw_faces()[list(TRAIN_FACES)])


# -- the runs ----------------------------------------------------------------------------------------------------------
def scaled_config(recipe: str, model: Path, data: Path, out: Path, steps: int, seed: int, **extra):
    """The shipped config with only model, data, output, size, steps (warm-up and lr kept at the shipped
    ``lr x steps``) and precision changed (module docstring)."""
    from firered_core.training.config import load_config

    path = CONFIG_FILES.get(recipe, CONFIGS / RECIPES[recipe])
    shipped = load_config(path)
    scale = shipped.steps / steps
    values = dict(model=str(model), data=str(data), output_dir=str(out), steps=steps, seed=seed,
                  lr=shipped.lr * scale, warmup_steps=round(shipped.warmup_steps / scale),
                  target_area=SIZE * SIZE, reference_area=SIZE * SIZE, vl_area=SIZE * SIZE, mixed_precision="no",
                  gradient_checkpointing=False, tracker=None, checkpoint_every=0, resume=None)
    values["validation.every"] = 0
    values.update(extra)
    return load_config(path, **values)


def held_samples(data: Path):
    from firered_core.training.data import load_dataset

    return load_dataset(str(data)).samples


@torch.no_grad()
def dpo_heldout(trainer, samples, draws: int = 4) -> tuple[float, float]:
    """Mean implicit reward margin and preference accuracy (ties 1/2) over held-out rows x fixed draws."""
    from firered_core.training.buckets import bucket_key

    trainer.transformer.eval()
    margins = []
    for i, s in enumerate(samples):
        for d in range(draws):
            inputs = trainer.row_inputs(s, bucket_key(s), EVAL_STEP + d, i)
            margins.append(trainer.row_objective(inputs, EVAL_STEP + d, i, s)[1]["dpo_margin"])
    trainer.transformer.train()
    m = np.asarray(margins)
    return float(m.mean()), float(((m > 0) + 0.5 * (m == 0)).mean())


@torch.no_grad()
def nft_heldout(trainer, samples) -> tuple[float, float]:
    """Mean reward of the current weights' edits (group_size each, fixed noise) of the held-out prompts, and the mean
    within-prompt standard deviation of those rewards (the spread NFT learns from: its unit of progress)."""
    from firered_core.training.buckets import bucket_key

    trainer.transformer.eval()
    means, spreads = [], []
    for i, s in enumerate(samples):
        inputs = trainer.row_inputs(s, bucket_key(s), EVAL_STEP, i)
        rewards = trainer.objective.nft.rollouts(s, inputs, EVAL_STEP, i, old=False).rewards
        means.append(float(rewards.mean()))
        spreads.append(float(rewards.std()))
    trainer.transformer.train()
    return float(np.mean(means)), float(np.mean(spreads))


@torch.no_grad()
def identity_heldout(trainer, samples, embedder) -> float:
    """Mean face-embedding distance of the one-step edit's faces to the targets' (held-out rows, fixed noise)."""
    from firered_core.sampling import noised_start, transformer_denoiser
    from firered_core.training.buckets import bucket_key
    from firered_core.training.identity import face_crops, identity_distance, train_size, x0_estimate

    trainer.transformer.eval()
    vae, out = trainer.model.vae, []
    for i, s in enumerate(samples):
        inputs = trainer.row_inputs(s, bucket_key(s), EVAL_STEP, i)
        size = train_size(inputs.img_shapes)
        target = face_crops(inputs.x0, s.faces, s.target_size, size, vae, 112)
        for k, sigma in enumerate(SIGMAS):
            noise = torch.randn(inputs.x0.shape, generator=torch.Generator().manual_seed(1000 * i + k))
            sig = torch.tensor([sigma])
            xt = noised_start(inputs.x0, noise, sig)
            v = transformer_denoiser(trainer.transformer, inputs.ref, inputs.img_shapes)(xt, sig, inputs.cond, "cond")
            crops = face_crops(x0_estimate(xt, sig, v), s.faces, s.target_size, size, vae, 112)
            out.append(float(identity_distance(embedder, crops, target).mean()))
    trainer.transformer.train()
    return float(np.mean(out))


def train_steps(trainer, steps: int) -> None:
    for _ in range(steps):
        trainer.train_step()


def swap_preferences(root: Path) -> Path:
    """The control's data: every row's preferred and dispreferred images swapped (the same pictures, the opposite
    preference)."""
    for jsonl in root.rglob("data.jsonl"):
        rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
        for row in rows:
            row["target_image"], row["rejected_image"] = row["rejected_image"], row["target_image"]
        jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return root


def run_dpo(model: Path, work: Path, seed: int, steps: int, control: bool = False) -> dict:
    """Held-out margin and accuracy before and after; ``control``: also after the same run on swapped preferences
    (measured against the true ones: a method that learns the preference must move them the other way)."""
    from firered_core.training.trainer import Trainer

    train = colour_rows(work / "dpo_train", TRAIN_ROWS["dpo"], 100, rejected=True)
    held = held_samples(colour_rows(work / "dpo_held", HELD_ROWS["dpo"], HELD_SEED[0], rejected=True))
    trainer = Trainer(scaled_config("dpo", model, train, work / f"dpo_run{seed}", steps, seed))
    m0, a0 = dpo_heldout(trainer, held)
    train_steps(trainer, steps)
    m1, a1 = dpo_heldout(trainer, held)
    out = {"margin_before": m0, "margin_after": m1, "accuracy_before": a0, "accuracy_after": a1}
    if control:
        swapped = swap_preferences(colour_rows(work / "dpo_swapped", TRAIN_ROWS["dpo"], 100, rejected=True))
        trainer = Trainer(scaled_config("dpo", model, swapped, work / f"dpo_swapped{seed}", steps, seed))
        train_steps(trainer, steps)
        out["margin_swapped"], out["accuracy_swapped"] = dpo_heldout(trainer, held)
    return out


def run_nft(model: Path, work: Path, seed: int, steps: int, control: bool = False) -> dict:
    """Held-out mean reward before and after; ``control``: also after the same run rewarded by the reward's negative
    (the reward must then fall: the effect follows the reward, not any training)."""
    from firered_core.training.trainer import Trainer

    sys.modules.setdefault("posttrain_effect", sys.modules[__name__])
    train = colour_rows(work / "nft_train", TRAIN_ROWS["nft"], 100, rejected=False)
    held = held_samples(colour_rows(work / "nft_held", HELD_ROWS["nft"], HELD_SEED[0], rejected=False))
    out = {}
    for name, reward in (("after", NFT_REWARD), ("negated", NFT_REWARD + "_negated"))[:2 if control else 1]:
        cfg = scaled_config("nft", model, train, work / f"nft_{name}{seed}", steps, seed,
                            **{"nft.reward.kind": "callable", "nft.reward.callable": f"posttrain_effect:{reward}"})
        trainer = Trainer(cfg)
        if name == "after":
            out["reward_before"], out["reward_spread_before"] = nft_heldout(trainer, held)
        train_steps(trainer, steps)
        out[f"reward_{name}"] = brightness_sign(reward) * nft_heldout(trainer, held)[0]  # always the true reward
    return out


def run_identity(model: Path, work: Path, seed: int, steps: int, control: bool = False) -> dict:
    """Held-out face distance after the run with the identity term and after the same run without it (the control
    is part of every cell)."""
    from firered_core.training.trainer import Trainer

    train = face_rows(work / "id_train", TRAIN_FACES, 8, 100)
    held = held_samples(face_rows(work / "id_held", HELD_FACES, HELD_ROWS["identity"], HELD_SEED[0]))
    embedder = planted_embedder()
    sys.modules.setdefault("posttrain_effect", sys.modules[__name__])
    out = {}
    for name, on in (("without", False), ("with", True)):
        trainer = Trainer(scaled_config("identity", model, train, work / f"id_{name}{seed}", steps, seed,
                                        **{"identity.enabled": on, "identity.detector": "",
                                           "identity.embedder": "posttrain_effect:planted_embedder"}))
        if name == "without":
            out["distance_before"] = identity_heldout(trainer, held, embedder)
        train_steps(trainer, steps)
        out[f"distance_{name}"] = identity_heldout(trainer, held, embedder)
    return out


RUNS = {"dpo": run_dpo, "nft": run_nft, "identity": run_identity}


def build(root: Path, b: int) -> Path:
    from firered_core.demo_models import build_model

    return build_model(root / f"tiny_build{b}", "tiny", seed=b)


EFFECTS = {  # recipe -> (name, effect of a cell): positive = the recipe did what it claims
    "dpo": (("held-out margin after - before", lambda c: c["margin_after"] - c["margin_before"]),
            ("held-out accuracy after - before", lambda c: c["accuracy_after"] - c["accuracy_before"])),
    "nft": (("held-out reward after - before", lambda c: c["reward_after"] - c["reward_before"]),
            ("the same in within-prompt reward std (before)",
             lambda c: (c["reward_after"] - c["reward_before"]) / c["reward_spread_before"])),
    "identity": (("face distance without - with the term", lambda c: c["distance_without"] - c["distance_with"]),),
}
CONTROLS = {  # recipe -> (control, key, base): the control run's change key - base (the effect must not come from it)
    "dpo": (("swapped preferences", "margin_swapped", "margin_before"),
            ("swapped preferences", "accuracy_swapped", "accuracy_before")),
    "nft": (("negated reward", "reward_negated", "reward_before"),),
    "identity": (("without the term", "distance_without", "distance_before"),),
}


def spread(v: np.ndarray) -> tuple[float, float, float]:
    """Mean, seed-to-seed standard deviation (ddof 1) and their ratio (+-inf when every seed gave the same value,
    as a quantised accuracy can)."""
    if len(v) < 2:
        return float(v.mean()), float("nan"), float("nan")
    sd = float(v.std(ddof=1))
    if sd < 1e-12 * max(1.0, float(np.abs(v).max())):
        sd = 0.0
    ratio = float(v.mean() / sd) if sd > 0 else math.copysign(math.inf, float(v.mean()))
    return float(v.mean()), sd, ratio


def effect_line(name: str, cells: list[dict], fn) -> list[str]:
    """One line per build (mean, std over its seeds, mean / std, cells > 0), then the pooled one."""
    builds = sorted({c["build"] for c in cells})
    out = [f"- {name}:"]
    for label, part in [(f"build {b}", [c for c in cells if c["build"] == b]) for b in builds] + [("pooled", cells)]:
        v = np.asarray([fn(c) for c in part])
        mean, sd, ratio = spread(v)
        out.append(f"  {label}: mean {mean:+.5f}, seed std {sd:.5f}, mean / std {ratio:.1f}, "
                   f"{int((v > 0).sum())} of {len(v)} > 0")
    return out


def groups(cells: list[dict]) -> list[tuple[str, int, list[dict]]]:
    """The cells by recipe (in :data:`RUNS` order) and step count."""
    keys = sorted({(c["recipe"], c.get("steps", STEPS[c["recipe"]])) for c in cells},
                  key=lambda k: (list(RUNS).index(k[0]), -k[1]))
    return [(r, n, [c for c in cells if c["recipe"] == r and c.get("steps", STEPS[r]) == n]) for r, n in keys]


def markdown(cells: list[dict]) -> str:
    """The table of docs/benchmarks.md: every cell, then each effect (and control) per build and pooled: mean,
    seed-to-seed std, their ratio and how many cells moved the right way."""
    lines = []
    for recipe, steps, rows in groups(cells):
        keys = [k for k in rows[0] if k not in ("recipe", "build", "seed", "seconds", "steps")]
        lines += [f"**{recipe}** ({RECIPES[recipe]}, {steps} steps)", "",
                  "| build | seed | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        lines += [f"| {c['build']} | {c['seed']} | " + " | ".join(f"{c[k]:.5f}" for k in keys) + " |" for c in rows]
        lines.append("")
        for name, fn in EFFECTS[recipe]:
            lines += effect_line(name, rows, fn)
        for name, key, base in CONTROLS[recipe]:
            if all(key in c for c in rows):
                lines += effect_line(f"control ({name}): {key} - {base}", rows, lambda c, k=key, b=base: c[k] - c[b])
        lines.append("")
    return "\n".join(lines)


def summary_table(cells: list[dict]) -> str:
    """The short table of README / docs/post-training.md: per recipe and effect, each build's mean and mean / seed
    std, the pooled ones, the cells that moved the right way, and the control's mean change."""
    builds = sorted({c["build"] for c in cells})
    lines = ["| recipe (steps) | held-out effect | " + " | ".join(f"build {b}: mean (mean / std)" for b in builds)
             + " | pooled (mean / std) | cells right way | control: mean change |",
             "|---" * (len(builds) + 5) + "|"]
    for recipe, steps, rows in groups(cells):
        for k, (name, fn) in enumerate(EFFECTS[recipe]):
            parts = []
            for part in [[c for c in rows if c["build"] == b] for b in builds] + [rows]:
                mean, _, ratio = spread(np.asarray([fn(c) for c in part]))
                parts.append(f"{mean:+.4g} ({ratio:.1f})")
            v = np.asarray([fn(c) for c in rows])
            ctrl = ""
            if k < len(CONTROLS[recipe]) and all(CONTROLS[recipe][k][1] in c for c in rows):
                name_c, key, base = CONTROLS[recipe][k]
                ctrl = f"{np.mean([c[key] - c[base] for c in rows]):+.4g} ({name_c})"
            lines.append(f"| {RECIPES[recipe]} ({steps}) | {name} | "
                         + " | ".join(parts) + f" | {int((v > 0).sum())} of {len(v)} | {ctrl} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", choices=sorted(RUNS), action="append")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--builds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=None, help="override the scaled-down step count")
    p.add_argument("--json", type=Path, default=None, help="append each cell as a JSON line here")
    p.add_argument("--config", type=Path, default=None, help="prove this config file instead of the shipped one "
                   "(one --recipe)")
    p.add_argument("--train-rows", type=int, default=None, help="DPO training pairs (default 8)")
    p.add_argument("--held-seed", type=int, default=200, help="seed of the held-out rows (the recipes were chosen "
                   "looking at 200; 300 is the fresh set)")
    p.add_argument("--control", action="store_true", help="also run each cell's control (DPO: swapped preferences; "
                   "NFT: the negated reward; identity always runs without the term)")
    p.add_argument("--table", type=Path, nargs="+", default=None, help="print the markdown tables of --json files "
                   "(the full one, then the short one) and exit")
    args = p.parse_args(argv)
    if args.table:
        cells = [json.loads(line) for path in args.table for line in path.read_text().splitlines() if line.strip()]
        print(markdown(cells) + "\n\n" + summary_table(cells))
        return
    HELD_SEED[0] = args.held_seed
    if args.train_rows:
        TRAIN_ROWS["dpo"] = args.train_rows
    if args.config:
        CONFIG_FILES[(args.recipe or ["dpo"])[0]] = args.config
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for recipe in args.recipe or sorted(RUNS):
            rows = []
            for b in args.builds:
                model = build(root, b)
                for seed in args.seeds:
                    t0 = time.perf_counter()
                    steps = args.steps or STEPS[recipe]
                    cell = RUNS[recipe](model, root / f"{recipe}_b{b}_s{seed}", seed, steps, control=args.control)
                    cell.update(recipe=recipe, build=b, seed=seed, steps=steps,
                                seconds=round(time.perf_counter() - t0, 1))
                    rows.append(cell)
                    print(json.dumps(cell), flush=True)
                    if args.json:
                        with args.json.open("a") as f:
                            f.write(json.dumps(cell) + "\n")
            print("\n" + markdown(rows))


if __name__ == "__main__":
    main()
