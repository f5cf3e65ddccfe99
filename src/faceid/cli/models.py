"""``faceid models``: the identity methods (families, face models, licences) and the released FaceID models by name,
or what adapter checkpoint files are."""

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
        print_families()
        print_methods()
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


# The licence of a family's reference weights, where one family is one release (faceid.methods.LICENCES); the
# Stable Diffusion families are many fine-tuned checkpoints, each under its own licence.
FAMILY_LICENCES = {"FLUX.1": "flux-1-dev"}


def print_families() -> None:
    """The base model families (``faceid.families``): their defaults, what runs on them, their licence."""
    from ..families import FAMILIES
    from ..methods import LICENCES, METHODS

    print("\nBase model families (--base-model):")
    pad = " " * 8
    for f in FAMILIES.values():
        d = f.defaults
        guidance = "embedded guidance" if f.guidance_embedded else "guidance"
        print(f"{f.name:<7} {f.pipeline_class()}: {d['width']}x{d['height']}, {d['num_inference_steps']} steps, "
              f"{guidance} {d['guidance_scale']}")  # fmt: skip
        methods = ", ".join(m.name for m in METHODS.values() if f.name in m.families and m.wired)
        adapters = "FaceID adapters (--adapter)" if f.faceid_adapters else "no FaceID adapter (--adapter none)"
        print(f"{pad}{adapters}; methods that generate: {methods or 'none yet'}")
        key = FAMILY_LICENCES.get(f.name)
        licence = LICENCES[key] if key else None
        said = f"{licence} ({licence.url})" if licence else "each checkpoint's own (most: CreativeML Open RAIL-M/++)"
        print(f"{pad}licence: {said}{'' if licence is None or licence.commercial else ' -- NOT for commercial use'}")


def print_methods() -> None:
    """The identity methods of ``faceid.methods``: base families, face models, files and licences."""
    from ..faces.model_files import FACE_PACKS
    from ..methods import METHODS

    print("\nIdentity methods (--method; only the ones marked 'generates' are wired into generation yet):")
    pad = " " * 14
    for m in METHODS.values():
        state = "generates" if m.wired else "not wired yet"
        pack = FACE_PACKS[m.face_pack]
        print(f"{m.name:<13} {m.title} on {' / '.join(m.families)} [{state}]")
        print(
            f"{pad}face models: insightface {m.face_pack} ({pack.detector} + {pack.recognizer}); embedding: "
            f"{m.recognizer}, {'L2-normalised' if m.normalised else 'raw'}"
        )
        for extra in m.face_inputs:
            print(f"{pad}also reads: {extra}")
        if m.files or m.model_sets:
            files = [f.path_in_repo for f in m.files]
            if m.model_sets:
                files.append(f"model sets {', '.join(m.model_sets)} (default {m.default_model_set})")
            repos = sorted({f.repo for f in m.all_files})
            pin = (
                f" ({len(m.unpinned)} not pinned: download them yourself)"
                if m.unpinned
                else " (pinned, sha256-checked)"
            )
            print(f"{pad}files ({', '.join(repos)}): {'; '.join(files)}{pin}")
            for asset in m.assets:
                print(f"{pad}and {asset.filename} from {asset.url} (sha256 {asset.sha256[:12]}...)")
        else:
            print(f"{pad}files: the released FaceID models above")
        print(f"{pad}licences: {m.licence_text()}{'' if m.commercial else ' -- NOT for commercial use'}")
