"""``faceid models``: the released models by name, or what adapter checkpoint files are."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``faceid models``."""
    parser.add_argument("checkpoints", nargs="*", help="adapter files (.bin/.safetensors) to describe")


def cmd_models(args: argparse.Namespace) -> int:
    from ..variants import ADAPTER_REPO, ADAPTER_REVISION, VARIANTS

    if not args.checkpoints:
        print(f"Released models (files in {ADAPTER_REPO}, pinned to commit {ADAPTER_REVISION[:7]} and sha256-checked):")
        print(f"{'name':<26} {'base':<6} {'needs':<24} file (+ the LoRA alone, where released)")
        pad = " " * 34
        for v in VARIANTS.values():
            needs = ["face photo(s)" if v.combine == "concat" else "face photo"]
            if v.image_encoder:
                needs.append("CLIP ViT-H")
            twin = f" (+ {v.lora.filename})" if v.lora else ""
            print(f"{v.name:<26} {v.family:<6} {' + '.join(needs):<24} {v.adapter.filename}{twin}")
            lora = f"LoRA rank {v.lora_rank}" if v.lora_rank else "no LoRA"
            print(f"{pad}{v.description} ({v.tokens_per_face} tokens per photo, {lora})")
            print(f"{pad}base model {v.base_model}" + (f", VAE {v.vae}" if v.vae else ""))
            pinned = [v.adapter.revision[:7] if v.adapter.revision else "main (not pinned)"]
            pinned.append(f"sha256 {v.adapter.sha256[:12]}..." if v.adapter.sha256 else "no sha256 (not checked)")
            encoder = (
                v.image_encoder and f"; image encoder {v.image_encoder}@{(v.image_encoder.revision or 'main')[:7]}"
            )
            print(f"{pad}pinned: {', '.join(pinned)}{encoder or ''}")
        print("\nUse a name with --adapter; files from anywhere work too (`faceid models FILE` says what one is).")
        return 0
    from ..checkpoints import AdapterSpec, load_state_dict
    from ..variants import released, releases_like

    for path in args.checkpoints:
        spec = AdapterSpec.from_state_dict(load_state_dict(path), Path(path).name)
        release = released(path)
        fits = spec.architectures
        if release:
            named = f"; released as {release.name}"
        elif fits:
            like = releases_like(fits, spec.family)  # none for a family without releases
            named = f"; variant {' or '.join(a.name for a in fits)}"
            named += f" (like {', '.join(v.name for v in like)})" if like else ""
        else:
            named = "; fits no released variant exactly (a layout of its own)"
        if len(fits) > 1 and not release:
            named += "; Plus and PlusV2 have the same tensors: the file cannot tell them apart (--shortcut chooses)"
        print(f"{path}: {spec.describe()}{named}")
    return 0
