"""Writing the single files ComfyUI users hold from a Hugging Face model folder (a conversion tool, kept apart from
the runtime readers): ``python -m firered_core.formats.convert MODEL_DIR OUT_DIR [--dtype bf16]``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


COMFY_FILE_NAMES = {"transformer": "transformer_comfy.safetensors", "vae": "vae_comfy.safetensors",
                    "text_encoder": "text_encoder_comfy.safetensors"}


def _folder_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def comfy_text_encoder_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 Qwen2.5-VL keys -> the layout of ComfyUI's text encoder files (``model.layers.*``,
    ``visual.*``, no ``lm_head``)."""
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            continue
        key = key.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
        out[key] = value
    return out


def write_comfy_single_files(model_dir: str | Path, out_dir: str | Path,
                             dtype: torch.dtype | None = None) -> dict[str, Path]:
    """Write a Hugging Face model folder's transformer, VAE and text encoder as the single files ComfyUI users
    hold: ``model.diffusion_model.``-prefixed transformer, Wan-VAE key names, Qwen2.5-VL in the original layout
    without ``lm_head`` (names in :data:`COMFY_FILE_NAMES`; ``dtype`` e.g. bf16 casts floating tensors)."""
    from safetensors.torch import save_file

    from .vae import convert_diffusers_vae_state

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    states = {
        "transformer": {f"model.diffusion_model.{k}": v for k, v in _folder_state(model_dir / "transformer").items()},
        "vae": convert_diffusers_vae_state(_folder_state(model_dir / "vae")),
        "text_encoder": comfy_text_encoder_state(_folder_state(model_dir / "text_encoder")),
    }
    paths = {}
    for kind, state in states.items():
        cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                for k, v in state.items()}
        paths[kind] = out_dir / COMFY_FILE_NAMES[kind]
        tmp = paths[kind].with_suffix(".tmp")
        save_file(cast, str(tmp))
        tmp.replace(paths[kind])
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m firered_core.formats.convert MODEL_DIR OUT_DIR [--dtype bf16]``: the single files for ComfyUI's
    folders (transformer -> models/diffusion_models, text encoder -> models/text_encoders, VAE -> models/vae)."""
    import argparse

    from ..model import DTYPES

    p = argparse.ArgumentParser(prog="python -m firered_core.formats.convert", description=main.__doc__)
    p.add_argument("model_dir", help="a FireRed model folder (Hugging Face layout)")
    p.add_argument("out_dir", help="where to write the three files")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="cast weights (default: as stored)")
    args = p.parse_args(argv)
    paths = write_comfy_single_files(args.model_dir, args.out_dir, DTYPES[args.dtype] if args.dtype else None)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
