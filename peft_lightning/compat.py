"""The transformers releases the prefix mechanism is tested with, and loud checks of the internals it uses.

injection/prefix.py registers kernels in transformers' `AttentionInterface` and mask interface, hands
over to the stock SDPA or the model's own eager kernel, and replaces DeBERTa's attention forward:
exactly the internals that change between minor releases. A change there must never degrade into
"no prefix applied", so:

  at import (importing this module, which prefix.py does first)
    - transformers older than the tested range: ImportError with the range and the pin to install;
      newer than the last tested release: a warning (it may work; nobody has checked);
    - every symbol we wrap, replace or alias exists with the parameters we call it with, else
      ImportError naming the symbol and the expected parameters;
  at model build (install_prefix_attention, once per model)
    - the model's own kernels (eager kernel, DeBERTa's attention forward) have those parameters;
    - self-check: a random prefix on the first attention slot changes that slot's output on a
      2-token input; if not, RuntimeError: the prefix is not reaching attention.

TESTED_TRANSFORMERS is the one place the range lives; tests/test_compat.py checks that
pyproject.toml's requirement agrees with it.
"""
from __future__ import annotations

import inspect
import sys
import warnings

import torch
import transformers
from packaging.version import Version

from peft_lightning.errors import IncompatibleVersion

# (lowest release, newest release); patch releases of the newest count as tested. .ci/compat runs the
# test suite on both (.ci/compat-oldest.txt, -newest.txt). Below 5.20, T5's attention does not go through
# the attention interface (5.15 and older have no T5 eager kernel; in 5.16-5.19 the self-check below finds
# the prefix never reaches T5's attention), and before 5.4 sdpa_mask took cache_position, not q_length.
TESTED_TRANSFORMERS = ("5.20", "5.24")


def pin() -> str:
    low, high = TESTED_TRANSFORMERS
    after = Version(high)
    return f'pip install "transformers>={low},<{after.major}.{after.minor + 1}"'


def _installed() -> str:
    """The transformers version, read from the module as imported now (sys.modules may hold a
    newer module object than the one this file saw at import)."""
    return sys.modules["transformers"].__version__


def check_transformers_version(version: str | None = None) -> None:
    """ImportError below the tested range, a warning above it."""
    version = version or _installed()
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    have = Version(version)
    tested = f"tested with transformers {TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}"
    if have.release[:2] < low.release[:2]:
        raise IncompatibleVersion(
            f"peft-lightning needs a newer transformers: installed {version}, {tested}. Install one with: {pin()}"
        )
    if have.release[:2] > high.release[:2]:
        warnings.warn(
            f"transformers {version} is newer than any release peft-lightning was tested with ({tested}); "
            f"if prefix methods misbehave, pin a tested one: {pin()}",
            stacklevel=2,
        )


def check_parameters(symbol: str, fn, expected: tuple[str, ...], keywords: tuple[str, ...] = ()) -> None:
    """`fn` takes `expected` as its leading parameters (in order; we pass them positionally) and
    accepts each of `keywords` (by name, or through **kwargs)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = None
    if params is not None:
        leading = tuple(p.name for p in params[: len(expected)])
        names = {p.name for p in params}
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        if leading == expected and all(k in names or var_kw for k in keywords):
            return
    found = "unknown" if params is None else f"({', '.join(p.name for p in params)})"
    want = ", ".join(expected) + (f"; accepting {', '.join(keywords)}" if keywords else "")
    raise IncompatibleVersion(
        f"transformers {_installed()} changed {symbol}, which the prefix mechanism wraps: expected "
        f"parameters ({want}), found {found}. Use a tested release: {pin()}"
    )


def _lookup(module: str, name: str):
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        raise IncompatibleVersion(
            f"transformers {_installed()} has no {module}.{name}, which the prefix mechanism uses. "
            f"Use a tested release: {pin()}"
        ) from None


KERNEL = ("module", "query", "key", "value", "attention_mask")


TESTED_LIGHTNING = "2.6"  # Trainer.fit/test(weights_only=...), which every checkpoint load passes


def check_lightning(version: str | None = None) -> None:
    import lightning

    version = version or lightning.__version__
    if Version(version).release[:2] < Version(TESTED_LIGHTNING).release[:2]:
        raise IncompatibleVersion(f"peft-lightning needs lightning>={TESTED_LIGHTNING} (Trainer.fit/test with "
                                  f"weights_only), installed {version}: pip install \"lightning>={TESTED_LIGHTNING},<3\"")


def check_causal_flags(slots) -> None:
    """A decoder's self-attention must still say `is_causal = True`: the prefix kernels read it to keep
    the causal mask once the prefix columns are added (a missing flag would let tokens see later ones,
    which the self-check's output comparison cannot notice)."""
    for role, module in slots:
        if role == "decoder" and getattr(module, "is_causal", None) is not True:
            raise IncompatibleVersion(
                f"transformers {_installed()}: {type(module).__module__}.{type(module).__name__} (a decoder's "
                f"self-attention) no longer has is_causal=True, which the prefix mechanism reads to keep the "
                f"causal mask. Use a tested release: {pin()}")


def check_transformers() -> None:
    """The versions, and every internal prefix.py imports, at import time."""
    check_lightning()
    check_transformers_version()
    mu = "transformers.masking_utils"
    sdpa = _lookup("transformers.integrations.sdpa_attention", "sdpa_attention_forward")
    check_parameters("transformers.integrations.sdpa_attention.sdpa_attention_forward", sdpa, KERNEL, ("is_causal",))
    for registry in ("transformers.AttentionInterface", f"{mu}.ALL_MASK_ATTENTION_FUNCTIONS"):
        module, _, name = registry.rpartition(".")
        if not callable(getattr(_lookup(module, name), "register", None)):
            raise IncompatibleVersion(f"transformers {_installed()}: {registry} has no register(); "
                              f"use a tested release: {pin()}")
    # our implementations alias the stock masks: that is only right while the stock kernels use them
    masks = _lookup(mu, "ALL_MASK_ATTENTION_FUNCTIONS")
    kernels = _lookup("transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS")
    for impl in ("sdpa", "eager"):
        mask_fn = _lookup(mu, f"{impl}_mask")
        check_parameters(f"{mu}.{impl}_mask", mask_fn, ("batch_size", "q_length", "kv_length"), ("attention_mask",))
        if masks.get(impl) is not mask_fn:
            raise IncompatibleVersion(f"transformers {_installed()} no longer builds '{impl}' masks with "
                              f"{mu}.{impl}_mask; use a tested release: {pin()}")
    if kernels.get("sdpa") is not sdpa:
        raise IncompatibleVersion(f"transformers {_installed()}: the 'sdpa' attention kernel is no longer "
                          f"sdpa_attention_forward; use a tested release: {pin()}")


def check_model_kernels(model, slot_modules, patched: bool) -> None:
    """The model-specific internals: its eager kernel (we call it for attn_implementation=eager) or,
    for architectures whose attention forward we replace, that forward's parameters."""
    if not slot_modules:
        return
    cls = type(slot_modules[0])
    where = sys.modules[cls.__module__]
    if patched:  # DeBERTa-v2: our forward replaces the stock one and falls back to it
        check_parameters(f"{cls.__module__}.{cls.__name__}.forward", cls.forward,
                         ("self", "hidden_states", "attention_mask", "output_attentions", "query_states",
                          "relative_pos", "rel_embeddings"))
        _lookup(cls.__module__, "scaled_size_sqrt")
        for attr in ("transpose_for_scores", "disentangled_attention_bias"):
            if not callable(getattr(cls, attr, None)):
                raise IncompatibleVersion(f"transformers {_installed()}: {cls.__module__}.{cls.__name__} has no "
                                  f"{attr}(), which the prefix mechanism uses; use a tested release: {pin()}")
    elif model.config._attn_implementation.endswith("eager"):
        check_parameters(f"{cls.__module__}.eager_attention_forward", _lookup(where.__name__, "eager_attention_forward"),
                         KERNEL, ("scaling", "dropout"))


class _Stop(Exception):
    """Raised by the self-check's hook once the first slot has run (the rest of the model is not needed)."""


def check_installed(model, slot_modules) -> None:
    """Called by install_prefix_attention once the kernels are in place."""
    from peft_lightning.backbone import attention_geometry
    from peft_lightning.injection.prefix import PATCHED_FORWARDS, PREFIX_KWARG, PrefixState

    check_model_kernels(model, slot_modules, model.config.model_type in PATCHED_FORWARDS)
    _, kv_heads, head_dim = attention_geometry(model.config)
    check_prefix_reaches_attention(model, slot_modules, kv_heads, head_dim, PREFIX_KWARG, PrefixState)


@torch.no_grad()
def check_prefix_reaches_attention(model, slot_modules, kv_heads: int, head_dim: int, prefix_kwarg: str,
                                   state_cls) -> None:
    """A random prefix on slot 0 must change slot 0's output on a 2-token input (costs two forwards
    up to the first attention module)."""
    if not slot_modules:
        return
    first = slot_modules[0]
    weight = model.get_input_embeddings().weight
    if weight.device.type == "meta":
        return  # nothing to run on yet
    outputs = []

    def capture(_module, _args, output):
        outputs.append((output[0] if isinstance(output, tuple) else output).detach().float().clone())
        raise _Stop

    ids = torch.tensor([[min(5, weight.shape[0] - 1), weight.shape[0] - 1]], device=weight.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids
    gen = torch.Generator(device="cpu").manual_seed(0)
    prefix = [torch.randn(1, kv_heads, 2, head_dim, generator=gen).to(weight) * 4 for _ in range(2)]
    state = state_cls({0: prefix[0]}, {0: prefix[1]})
    was_training = model.training
    model.eval()  # dropout would make the two runs differ whatever the prefix does
    handle = first.register_forward_hook(capture)
    try:
        for kwargs in ({}, {prefix_kwarg: state}):
            try:
                model(**inputs, **kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
        model.train(was_training)
        for module in slot_modules:  # a patched forward's state (its post-hook did not run)
            if getattr(module, "_peft_prefix_state", None) is not None:
                module._peft_prefix_state = None
    if len(outputs) != 2 or not (outputs[0] - outputs[1]).abs().max() > 1e-4:
        raise RuntimeError(
            f"The prefix mechanism is not reaching attention in transformers {_installed()} "
            f"({model.config.model_type}, {model.config._attn_implementation}): a random prefix left the first "
            f"attention module's output unchanged, so every prefix method would silently train nothing. "
            f"Use a tested release: {pin()}"
        )


check_transformers()
