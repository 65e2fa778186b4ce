"""Export an adapter to the HF `peft` format, for people whose serving stack loads `peft`, and
import peft LoRA (DoRA) / prefix-tuning adapters to continue training or serve them here.

    python -m peft_lightning.export <adapter dir> <out dir> [--overwrite]
    module = import_peft("<peft adapter dir>", model={"name_or_path": "roberta-base"}, num_labels=2)

Writes what `peft.PeftModel.from_pretrained(base_model, out_dir)` loads, for the methods with a
peft twin:
  lora, dora           LoraConfig (dora: use_dora=True, + lora_magnitude_vector) + lora_A / lora_B
                       per target: peft computes exactly what we do.
  ia3                  IA3Config + ia3_l per target (keys and values: the output, the feed-forward
                       projection: its input); GPT-2's fused q/k/v gets ones on its query third.
  ptuning_v2, prefix_tuning (deep, every layer)
                       PrefixTuningConfig + the flat prefix (`prompt_embeddings`, the MLP
                       ejected); the key/value layout is the same as ours.
The classification head has no place in peft's format for a bare backbone: it is written next to
it as head.safetensors (apply it to the last hidden states, as `ClassificationHead` does).

Not identical, by peft's design: peft feeds a prefix through `past_key_values`, which shifts the
real tokens' position ids by the prefix length (absolute positions for BERT-like models, rotary
angles for Llama), where ours keeps them. An exported prefix therefore gives close but not equal
outputs under peft; LoRA is exact.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from peft_lightning.checkpoint import load_pretrained
from peft_lightning.errors import AdapterError, OutputError, UserError


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError as err:
        raise ImportError("exporting to the peft format needs peft: pip install peft") from err


def export_peft(module, directory: str | Path) -> Path:
    _require_peft()
    from peft import IA3Config, LoraConfig, PrefixTuningConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    method = module.hparams.method
    name = method["name"]
    base = module.hparams.model.get("name_or_path")
    if name in ("lora", "dora"):
        tensors, targets, conv1d = {}, [], False
        for key, lora in module.lora.items():
            target = key.replace("-", ".")
            targets.append(target)
            conv1d |= type(module.backbone.get_submodule(target)).__name__ == "Conv1D"
            tensors[f"base_model.model.{target}.lora_A.weight"] = lora.A.detach().contiguous().cpu()
            tensors[f"base_model.model.{target}.lora_B.weight"] = lora.B.detach().contiguous().cpu()
            if name == "dora":
                magnitude = lora.magnitude.detach().contiguous().cpu()
                tensors[f"base_model.model.{target}.lora_magnitude_vector"] = magnitude
            if lora.gate is not None:
                raise AdapterError("a gated LoRA (unipelt) has no peft twin")
        config = LoraConfig(r=int(method.get("r", 8)), lora_alpha=float(method.get("alpha", 16)),
                            lora_dropout=float(method.get("dropout", 0.0)), target_modules=targets,
                            fan_in_fan_out=conv1d, use_dora=name == "dora", task_type="FEATURE_EXTRACTION",
                            base_model_name_or_path=base)
    elif name == "ia3":
        tensors, targets, feedforward, conv1d = {}, [], [], False
        for key, scale in module.ia3.items():
            target = key.replace("-", ".")
            targets.append(target)
            conv1d |= type(module.backbone.get_submodule(target)).__name__ == "Conv1D"
            vector = scale.vector.detach().cpu()
            if scale.on_input:  # the feed-forward's intermediate activation: a peft feed-forward module, (1, in)
                feedforward.append(target)
                vector = vector[None]
            else:  # scales its output, (out, 1); a fused q/k/v projection keeps its query third as is
                vector = torch.cat([torch.ones(scale.start), vector])[:, None]
            tensors[f"base_model.model.{target}.ia3_l"] = vector.contiguous()
        config = IA3Config(target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=conv1d,
                           task_type="FEATURE_EXTRACTION", base_model_name_or_path=base)
    elif name in ("ptuning_v2", "prefix_tuning") and getattr(module, "depth", None) == "deep":
        from peft_lightning.backbone import attention_geometry

        if module.kind == "encoder-decoder":
            raise AdapterError("peft's prefix format for encoder-decoders differs; export supports encoders and decoders")
        layers, kv_heads, head_dim = attention_geometry(module.backbone.config)
        flat = module.prefix.encoder().detach().contiguous().cpu()  # (P, layers x 2 x kv_heads x head_dim)
        tensors = {"prompt_embeddings": flat}
        config = PrefixTuningConfig(num_virtual_tokens=module.prefix_length, num_layers=layers,
                                    token_dim=kv_heads * head_dim, num_attention_heads=kv_heads,
                                    task_type="FEATURE_EXTRACTION", base_model_name_or_path=base)
    else:
        raise AdapterError(
            f"method={name} (depth={method.get('depth')}) has no peft twin here; export supports lora, dora, ia3 "
            "and deep ptuning_v2 / prefix_tuning"
        )
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    head = {f"head.{k}": v.detach().contiguous().cpu() for k, v in module.head.state_dict().items()}
    if head:
        save_file(head, str(directory / "head.safetensors"), metadata={"format": "pt"})
    return directory


def import_peft(directory: str | Path, model: dict | None = None, num_labels: int = 2,
                labels: list[str] | None = None):
    """Our module from a peft LoRA (DoRA) or prefix-tuning (no projection) adapter directory, with its
    `head.safetensors` if present (else a fresh head). `model` defaults to the adapter's
    base_model_name_or_path."""
    import json
    import re

    from safetensors.torch import load_file

    from peft_lightning.methods import METHODS

    directory = Path(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    model = model or {"name_or_path": config.get("base_model_name_or_path")}
    kind = config.get("peft_type")
    if kind == "LORA":
        targets = config["target_modules"]
        targets = [targets] if isinstance(targets, str) else list(targets)
        patterns = [rf"(^|\.){re.escape(t)}$" for t in targets]
        kind_name = "dora" if config.get("use_dora") else "lora"
        method = {"name": kind_name, "r": config["r"], "alpha": config["lora_alpha"],
                  "dropout": config.get("lora_dropout", 0.0), "target_modules": patterns}
        module = METHODS[kind_name](model=model, method=method, num_labels=num_labels, labels=labels)
        state = {}
        pairs = [("A", "lora_A.weight"), ("B", "lora_B.weight")]
        if kind_name == "dora":
            pairs.append(("magnitude", "lora_magnitude_vector"))
        for key in module.lora:
            name = key.replace("-", ".")
            for ours, theirs in pairs:
                found = f"base_model.model.{name}.{theirs}"
                if found not in tensors:
                    raise KeyError(f"{directory}: no tensor {found} for target {name}")
                state[f"lora.{key}.{ours}"] = tensors[found]
    elif kind == "PREFIX_TUNING" and not config.get("prefix_projection"):
        method = {"name": "ptuning_v2", "prefix_length": config["num_virtual_tokens"], "depth": "deep",
                  "reparameterization": "none"}
        module = METHODS["ptuning_v2"](model=model, method=method, num_labels=num_labels, labels=labels)
        state = {"prefix.encoder.embedding.weight": tensors["prompt_embeddings"]}
    else:
        raise ValueError(f"{directory}: importing peft_type={kind} (prefix_projection={config.get('prefix_projection')})"
                         " is not supported; LoRA and prefix tuning without projection are")
    head = directory / "head.safetensors"
    if head.is_file():
        state.update(load_file(str(head)))
    missing = [k for k, v in state.items() if module.state_dict()[k].shape != v.shape]
    if missing:
        raise ValueError(f"{directory}: tensors {missing[:3]} do not fit model {model}: another backbone?")
    module.load_state_dict(state, strict=False)
    return module.eval()


def check_output_folder(adapter: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output folder that would destroy the input or other files: the adapter folder itself
    or a folder inside it (symlinks resolved: peft's file names are ours, adapter_config.json and
    adapter_model.safetensors would be overwritten), or a non-empty folder without --overwrite."""
    source, target = adapter.resolve(), out.resolve()
    if target == source or source in target.parents:
        where = "the adapter folder" if target == source else "inside the adapter folder"
        raise OutputError(f"output folder {out} is {where} {adapter}: the export would overwrite or mix with the "
                          "adapter's files; choose a folder outside it")
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"output folder {out} is not empty; pass --overwrite to replace the files export writes "
                          "(adapter_config.json, adapter_model.safetensors, head.safetensors), or choose an empty "
                          "folder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_lightning.export", description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output folder (its files of the same names are replaced)")
    args = parser.parse_args(argv)
    try:
        check_output_folder(args.adapter, args.out, args.overwrite)  # before anything is loaded or written
        out = export_peft(load_pretrained(args.adapter), args.out)
    except (UserError, ImportError) as err:  # bad input, or peft missing: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load with peft.PeftModel.from_pretrained(base_model, '{out}'))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
