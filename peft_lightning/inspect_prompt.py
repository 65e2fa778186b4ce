"""The nearest vocabulary tokens of each learned virtual token, by cosine similarity (the
analysis of Lester et al., 2021, section 7).

    python -m peft_lightning.inspect_prompt outputs/train/runs/<time>/adapter [--top 5]

Which vectors: for input-level prompts (prompt_tuning, p_tuning, depth=embedding) the prompt
vectors actually placed in front of the input; for reparameterized deep prefixes, the table in
embedding space that feeds the MLP/LSTM. A deep prefix without reparameterization lives in
key/value space, not embedding space, and has no nearest tokens.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from peft_lightning.backbone import BackboneSpec, load_tokenizer
from peft_lightning.checkpoint import load_pretrained
from peft_lightning.errors import AdapterError, UserError


@torch.no_grad()
def nearest_tokens(module, tokenizer, top: int = 5) -> list[list[tuple[str, float]]]:
    """Per virtual token, the `top` (token, cosine similarity) pairs."""
    encoder = getattr(module, "prompt_encoder", None)
    if encoder is None:
        raise AdapterError(f"method={module.hparams.method['name']} has no virtual tokens")
    if module.prompt is not None:
        vectors = encoder()
    elif encoder.net is not None:
        vectors = encoder.embedding.weight
    else:
        raise AdapterError("this deep prefix has no reparameterization: its vectors are keys/values, not embeddings")
    vocab = module.backbone.get_input_embeddings().weight
    sims = torch.nn.functional.normalize(vectors.float(), dim=-1) @ torch.nn.functional.normalize(vocab.float(), dim=-1).T
    scores, ids = sims.topk(top, dim=-1)
    return [[(tokenizer.convert_ids_to_tokens(int(i)), float(s)) for s, i in zip(row_s, row_i)]
            for row_s, row_i in zip(scores, ids)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_lightning.inspect_prompt", description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        module = load_pretrained(args.adapter)
        rows = nearest_tokens(module, load_tokenizer(BackboneSpec(**module.hparams.model)), args.top)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for i, row in enumerate(rows):
        print(f"virtual token {i:3d}: " + "  ".join(f"{tok} ({sim:.2f})" for tok, sim in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
