"""``firered-edit``: one instruction-driven edit from the command line.

With no ``--model`` it runs the built-in tiny demo model (random weights, built offline on first use): the pipeline
runs end to end, but the picture it writes is noise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .conditioning import PROMPT_MODES
from .formats import GGUF_MODES
from .errors import InputError
from .geometry import VAE_AREA, VL_AREA
from .model import OFFLOAD_MODES

DEMO_NOTE = ("firered-edit: no --model given, using the built-in tiny demo model (random weights): "
             "the pipeline runs end to end, but the output image is noise.")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Where the model comes from and how it is placed (shared by ``firered-edit`` and ``firered-bench``)."""
    p.add_argument("--model", help="Hugging Face layout folder (model_index.json, transformer/, vae/, ...); "
                                   "omit to run the tiny demo model")
    p.add_argument("--transformer", help="transformer weights: a folder or a single file (safetensors / GGUF)")
    p.add_argument("--vae", help="VAE weights: a folder or a single file")
    p.add_argument("--text-encoder", help="Qwen2.5-VL text encoder: a folder or a single file")
    p.add_argument("--tokenizer", help="folder with the Qwen2.5-VL tokenizer files (vocab.json, merges.txt, "
                                       "tokenizer_config.json; a processor/ folder works too) for a single-file "
                                       "text encoder (default: the model folder's, or files next to the text encoder)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="LoRA to apply (repeatable); strength defaults to 1.0")
    p.add_argument("--allow-partial-lora", action="store_true", help="apply a LoRA even if some keys do not match")
    p.add_argument("--lora-mode", choices=("merge", "adapter"), default=None,
                   help="merge LoRAs into the weights, or run them as adapters (default: merge; adapter for a "
                        "runtime GGUF transformer, whose packed layers cannot be merged into)")
    p.add_argument("--gguf-mode", choices=GGUF_MODES, default=GGUF_MODES[0],
                   help="GGUF transformer: keep weights packed and decode them per layer at run time (memory ~ file "
                        "size, default), or dequantise everything at load")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="compute dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--offload", choices=OFFLOAD_MODES, default=OFFLOAD_MODES[0],
                   help="'model' keeps each component on the CPU until it runs")


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    """How each edit is sampled (shared by ``firered-edit`` and ``firered-bench``)."""
    p.add_argument("-n", "--negative-prompt", default=" ", help="negative prompt for true CFG (default ' ')")
    p.add_argument("--steps", type=int, default=None, help="sampling steps, 1..1000 (default 40; 8 for the demo "
                                                            "model; a distilled LoRA's own count)")
    p.add_argument("--true-cfg", type=float, default=None, help="true CFG scale; <= 1 disables it (default 4; "
                                                                 "off with a distilled LoRA)")
    p.add_argument("--seed", type=int, default=0, help="random seed (CPU generator: same image on every device)")
    p.add_argument("--width", type=int, help="output width, a multiple of 16 (default: ~1 MP at the last "
                                             "image's aspect ratio)")
    p.add_argument("--height", type=int, help="output height, a multiple of 16")
    p.add_argument("--match-input-size", action="store_true",
                   help="output exactly the last image's size (padded to a multiple of 16 and cropped back: "
                        "no zoom, no shift); overrides --width/--height/--vae-area")
    p.add_argument("--shift", type=float, default=None, help="constant schedule shift, 0..20 (default or 0: the "
                                                              "dynamic shift)")
    p.add_argument("--vl-area", type=int, default=VL_AREA, help="pixel area of references for the VL encoder")
    p.add_argument("--vae-area", type=int, default=VAE_AREA, help="pixel area of references for the VAE")
    p.add_argument("--prompt-mode", choices=PROMPT_MODES, default=PROMPT_MODES[0],
                   help="'pipeline' (Picture N labels, the official inference) or 'chat' (FireRed's trainer)")


def add_mask_and_pack_arguments(p: argparse.ArgumentParser) -> None:
    """Masked edits (``masks``) and packing more than 3 images (``packing``)."""
    p.add_argument("--mask", metavar="FILE",
                   help="confine the edit of the last image to a mask: white (or, with transparency, the "
                        "transparent part, as ComfyUI's mask editor saves it) may change, black stays exactly as it "
                        "is, grey partly; any size (stretched to the image). The output has the image's size")
    p.add_argument("--feather", type=int, default=None,
                   help="with --mask or --preserve auto: pixels over which the edit fades in inside the region's "
                        "border (default 8 with --mask, 2 with --preserve auto; 0 = hard edge)")
    p.add_argument("--color-match", choices=("off", "mean-std", "histogram"), default="off",
                   help="with --mask: undo the edit's colour drift measured outside the mask (default off)")
    p.add_argument("--pack", choices=("auto", "off"), default="auto",
                   help="with more than 3 images: crop each to its region of interest and pack them into 2-3 "
                        "composites, rewriting 'Picture N' / '图N' mentions (auto, default), or pass them as they "
                        "are (off)")
    p.add_argument("--box", action="append", default=[], metavar="N:X0,Y0,X1,Y1",
                   help="region of interest of image N (1-based, pixels) for packing (repeatable); other images "
                        "get an automatic proposal")
    p.add_argument("--composites", type=int, default=None,
                   help="number of composites when packing (1-3; default 2 for 4 images, 3 from 5)")
    p.add_argument("--pack-megapixels", type=float, default=1.0,
                   help="area of each composite in units of 1024x1024 pixels (default 1)")
    p.add_argument("--no-roi", action="store_true", help="packing: keep images whole (no automatic cropping)")
    p.add_argument("--recaption-url", default=None,
                   help="packing: rephrase the rewritten instruction through this OpenAI-compatible endpoint "
                        "(e.g. https://api.openai.com/v1; off by default; replies cached, failures retried)")
    p.add_argument("--recaption-model", default=None, help="packing: the endpoint's model name")
    p.add_argument("--recaption-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the endpoint's API key (default OPENAI_API_KEY)")
    p.add_argument("--recaption-images", action="store_true", help="packing: send the composites with the request")


def add_preserve_arguments(p: argparse.ArgumentParser) -> None:
    """Automatic preservation of unedited pixels (``preserve``) and edit chains (``chains``)."""
    p.add_argument("--preserve", choices=("off", "auto"), default="off",
                   help="auto: find the region the edit really changed (no mask painted) and keep every other pixel "
                        "of the input exactly; the region is saved next to the output as <name>_mask.png. When the "
                        "change is global (a restyle), the edit is kept whole and a note says so")
    p.add_argument("--preserve-color", choices=("fit", "off", "mean-std", "histogram"), default="fit",
                   help="with --preserve auto: remove the edit's global colour drift fitted outside the region "
                        "(fit, default), or off, or match colours as --color-match does")
    p.add_argument("--then", action="append", default=[], metavar="PROMPT",
                   help="a further instruction applied to the result (repeatable): an edit chain; each round's "
                        "result is saved as <name>_round<k>.png, the last at --output")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firered-edit", description="Instruction-driven image editing with FireRed.")
    add_model_arguments(p)
    p.add_argument("-i", "--image", action="append", default=[], help="input image (repeatable, 1-3 recommended; "
                                                                       "none = text-to-image)")
    p.add_argument("-p", "--prompt", required=True, help="the edit instruction")
    add_edit_arguments(p)
    add_mask_and_pack_arguments(p)
    add_preserve_arguments(p)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("-o", "--output", default="firered_edit.png", help="output image path")
    p.add_argument("-v", "--verbose", action="store_true")
    from .options import add_arguments

    add_arguments(p)
    return p


NUMERIC_OPTIONS = ("steps", "true_cfg", "seed", "width", "height", "num_images", "shift", "vl_area", "vae_area",
                   "feather", "pack_megapixels")


def lora_specs(args: argparse.Namespace) -> list:
    """The ``--lora FILE[:STRENGTH]`` specs, each strength checked against its range."""
    from .lora import LoraSpec
    from .limits import check

    specs = [LoraSpec.parse(s) for s in args.lora]
    for text, spec in zip(args.lora, specs):
        check({"strength": spec.strength}, spell=lambda _: f"--lora {text}: strength",
              limits={"strength": "lora_strength"})
    return specs


def _apply_loras(transformer, args: argparse.Namespace) -> None:
    """Apply every ``--lora`` and print its coverage (keys matched / unmatched, modules touched)."""
    from .lora import apply_loras, default_mode

    mode = args.lora_mode or default_mode(transformer)
    report = apply_loras(transformer, lora_specs(args), mode=mode, allow_partial=args.allow_partial_lora)
    print(f"LoRA mode: {mode}", file=sys.stderr)
    print(report.summary(), file=sys.stderr)


def _pack(images: list, args: argparse.Namespace) -> tuple[list, str]:
    """Pack more than 3 images into composites (``--pack auto``); print the mapping and the rewritten prompt."""
    from .images import pil_to_tensor, tensor_to_pil
    from .packing import PackError, pack_pictures, parse_boxes

    if args.mask:
        raise PackError("--mask applies to the edited (last) image, which packing would merge into a composite; "
                        "use --pack off with --mask, or give at most 3 images")
    result = pack_pictures([pil_to_tensor(i) for i in images], boxes=parse_boxes(";".join(args.box)),
                           composites=args.composites, area=args.pack_megapixels * 1024 * 1024,
                           auto_roi=not args.no_roi)
    prompt = result.rewrite(args.prompt)
    print(f"packed {len(images)} images into {len(result.composites)} composites:\n{result.table()}\n"
          f"instruction: {prompt}", file=sys.stderr)
    if args.recaption_url or args.recaption_model:
        from .llm import ChatClient
        from .recaption import endpoint, recaption

        client = ChatClient(endpoint(args.recaption_url, args.recaption_model, args.recaption_key_env))
        prompt = recaption(client, args.prompt, prompt, result, with_images=args.recaption_images)
        print(f"recaptioned instruction: {prompt}", file=sys.stderr)
    return [tensor_to_pil(c) for c in result.composites], prompt


def _output_paths(output: str, count: int) -> list[Path]:
    out = Path(output)
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(count)]


def check_number_args(args: argparse.Namespace) -> None:
    """Every numeric option present in ``args`` against its range, and each ``--lora`` strength: before any model
    is loaded, the option named in the error."""
    from . import options
    from .limits import check

    check({name: getattr(args, name) for name in NUMERIC_OPTIONS if hasattr(args, name)},
          spell=lambda name: "--" + name.replace("_", "-"))
    options.check({name: getattr(args, name) for name in options.names() if hasattr(args, name)},
                  spell=lambda name: options.BY_NAME[name].flag)
    lora_specs(args)


def is_demo(args: argparse.Namespace) -> bool:
    return args.model is None and not (args.transformer and args.vae and args.text_encoder)


def load_from_args(args: argparse.Namespace, device: str | None = None):
    """The model the model arguments name (the demo model without ``--model``) with its model-level speed settings,
    LoRAs applied; the default step count for it (40; 8 for the demo); and the speed settings (``.run`` is for the
    pipeline). ``device`` overrides ``--device`` (one GPU per process in a sharded run)."""
    import torch

    from .demo_models import build_model, default_demo_dir
    from .model import load_model
    from .speed import from_args

    speed = from_args(args)
    device = device or args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if str(device).startswith("cuda") else "fp32")
    if is_demo(args):
        print(DEMO_NOTE, file=sys.stderr)
        model_dir, steps = build_model(default_demo_dir(), "tiny"), 8
    else:
        model_dir, steps = args.model, 40
    model = load_model(model_dir, dtype=dtype, device=device, offload=args.offload, gguf_mode=args.gguf_mode,
                       settings=speed.model, transformer=args.transformer, vae=args.vae,
                       text_encoder=args.text_encoder, tokenizer=args.tokenizer)
    if args.transformer:
        model.get("transformer")  # a bad single file fails here, before anything is encoded
    if args.lora:
        _apply_loras(model.transformer, args)
    steps = _use_lora_schedule(model, args, steps)
    return model, steps if args.steps is None else args.steps, speed


def _use_lora_schedule(model, args: argparse.Namespace, steps: int) -> int:
    """A distilled LoRA's saved schedule (:mod:`firered_core.lora.schedule`) becomes the defaults: its step count
    and CFG off (``--steps`` / ``--true-cfg`` still win; the pipeline uses its sigmas whenever the step count is
    its own). Sets ``args.true_cfg`` when it was left out; returns the default step count."""
    from .lora import schedule_of

    schedule = schedule_of(lora_specs(args)) if args.lora else None
    model.lora_schedule = schedule
    if args.true_cfg is None:
        args.true_cfg = 4.0 if schedule is None else schedule.true_cfg
    if schedule is None:
        return steps
    print(f"LoRA schedule: {schedule.describe()}", file=sys.stderr)
    if args.steps not in (None, schedule.steps):
        print(f"firered-edit: warning: --steps {args.steps} is not the {schedule.steps} steps the LoRA was distilled "
              "for: sampling with the checkpoint's schedule instead of its own", file=sys.stderr)
    return schedule.steps


def run(args: argparse.Namespace) -> list[Path]:
    from tqdm import tqdm

    from .conditioning import check_prompt_text
    from .images import check_output_path, load_image
    from .pipeline import EditPipeline
    from .speed import from_args

    check_number_args(args)
    check_prompt_text(args.prompt, "--prompt", "prompt")  # before anything is loaded
    check_prompt_text(args.negative_prompt, "--negative-prompt", "negative_prompt")
    check_output_path(args.output)
    from_args(args)  # bad speed settings fail before anything is loaded
    images = [load_image(p) for p in args.image]
    prompt = args.prompt
    if len(images) > 3 and args.pack == "auto":
        images, prompt = _pack(images, args)
    mask = None
    if args.mask:
        from .masks import load_mask, warn_if_empty

        if not images:
            raise InputError("--mask needs an image (-i) to edit", field="mask")
        mask = load_mask(args.mask)
        warn_if_empty(mask, f"--mask {args.mask}")  # before the model loads
    demo = is_demo(args)
    model, steps, speed = load_from_args(args)
    width, height = args.width, args.height
    if demo and not images and width is None and height is None:
        width = height = 256
    rounds = 1 + len(args.then)
    bar = tqdm(total=steps * rounds, desc="sampling", unit="step")
    kwargs = dict(negative_prompt=args.negative_prompt, steps=steps, true_cfg=args.true_cfg, width=width,
                  height=height, vl_area=args.vl_area, vae_area=args.vae_area, prompt_mode=args.prompt_mode,
                  shift=args.shift or None, match_input=args.match_input_size, callback=lambda info: bar.update(1),
                  feather=_feather(args), preserve_color=args.preserve_color)
    pipe = EditPipeline(model, speed.run)
    if args.then:
        return _run_chain(pipe, images, [prompt, *args.then], args, bar, kwargs)
    result = pipe.edit(images, prompt, seed=args.seed, num_images=args.num_images, mask=mask,
                       color_match=args.color_match, preserve=args.preserve, **kwargs)
    bar.close()
    paths = _output_paths(args.output, len(result.images))
    for k, (img, path) in enumerate(zip(result.images, paths)):
        _save(img, path)
        if result.masks is not None:
            _save(_mask_picture(result.masks[k]), path.with_name(f"{path.stem}_mask.png"))
    for note in result.notes:
        print(note, file=sys.stderr)
    return paths


def _feather(args: argparse.Namespace) -> int:
    """--feather, else 8 for a painted mask (its border is loose) and 2 for --preserve auto (a tight estimate)."""
    if args.feather is not None:
        return args.feather
    return 2 if args.preserve == "auto" else 8


def _save(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    print(f"wrote {path} ({img.width}x{img.height})")


def _mask_picture(mask):
    from PIL import Image

    return Image.fromarray((mask.clamp(0, 1).numpy() * 255).round().astype("uint8"), mode="L")


def _run_chain(pipe, images: list, prompts: list[str], args: argparse.Namespace, bar, kwargs: dict) -> list[Path]:
    """``-p first --then second ...``: an edit chain (``chains.edit_chain``); every round's result is saved."""
    from .chains import edit_chain

    if args.mask or args.num_images != 1:
        raise InputError("--then (an edit chain) edits one picture per round: drop --mask and --num-images",
                         field="then")
    if not images:
        raise InputError("--then (an edit chain) needs an image (-i) to edit", field="then")
    chain = edit_chain(pipe, images, prompts, preserve=args.preserve, seed=args.seed, **kwargs)
    bar.close()
    out = Path(args.output)
    paths = []
    for k, img in enumerate(chain.rounds[:-1]):
        paths.append(out.with_name(f"{out.stem}_round{k + 1}{out.suffix}"))
        _save(img, paths[-1])
    paths.append(out)
    _save(chain.image, out)
    if args.preserve == "auto":
        _save(_mask_picture(chain.union.float()), out.with_name(f"{out.stem}_mask.png"))
    for note in chain.notes:
        print(note, file=sys.stderr)
    print(f"{len(prompts)} rounds; {chain.reused} reused the previous round's latent (no VAE encode)",
          file=sys.stderr)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Bad input (a :class:`FireRedError`, or an OS error on a user's file) is one line and exit status 2; anything
    else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from .errors import FireRedError, one_line

    try:
        run(args)
    except (FireRedError, OSError) as exc:
        print(f"firered-edit: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
