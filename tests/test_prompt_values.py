"""Input-level prompts checked by value: a method's token-level hidden states (prompt joined, then
stripped) equal a reference computed here by hand from transformers' public modules.

The reference reproduces the documented join (injection/input_prompt.py, README "How prefixes get
in") without our code path: encoders run their own embedding module on the real tokens (positions
0..L-1, their token types), put the prompt in front and run the encoder stack on the result with a
mask we build; decoders get `inputs_embeds = cat(prompt, embed(ids))` with position ids
(0,...,0, 0..L-1); encoder-decoders prompt the encoder only and return the decoder's states (there
is nothing to strip). We slice [P:] ourselves. The reference model is a fresh copy of the weights
with no hooks of ours. A mutated `strip` (dropping the last P positions instead of the first) must
disagree, so these tests can fail where the old shape-only checks could not.
"""
import pytest
import torch
from conftest import ARCHS, TINY, make_batch, tiny_model

from peft_lightning.backbone import BackboneSpec, load_backbone
from peft_lightning.injection import InputPrompt
from peft_lightning.methods import METHODS

P, L, ATOL = 4, 9, 1e-5
KIND = {"bert": "encoder", "roberta": "encoder", "deberta-v2": "encoder", "gpt2": "decoder", "llama": "decoder",
        "t5": "encoder-decoder", "bart": "encoder-decoder"}
# every input-level prompt method: prompt_tuning, p_tuning (biLSTM) and a prefix method moved to the input
METHOD_CFG = {
    "prompt_tuning": dict(reparameterization="none"),
    "p_tuning": dict(reparameterization="lstm", reparam_hidden=16),
    "ptuning_v2": dict(reparameterization="none"),
}
CASES = [("prompt_tuning", a) for a in ARCHS] + [(m, a) for m in ("p_tuning", "ptuning_v2")
                                                 for a in ("bert", "gpt2", "bart")]


def build(name, arch):
    torch.manual_seed(0)
    cfg = dict(name=name, prefix_length=P, depth="embedding", init="random", prefix_dropout=0.0,
               head={"dropout": 0.0}, **METHOD_CFG[name])
    module = METHODS[name](model=tiny_model(arch), method=cfg, num_labels=2).eval()
    with torch.no_grad():  # a prompt at the scale of the (layer-normed) embeddings, so it matters
        module.prompt.embedding.weight.normal_(0, 1)
    return module


def batch_for(arch):
    batch = make_batch(arch, length=L)  # the last example is half padding
    if arch == "bert":  # token types must follow the real tokens, not shift with the prompt
        batch["token_type_ids"] = (torch.arange(L) >= L // 2).long().expand(3, -1).clone()
    return batch


def reference_model(module):
    """The same weights in a fresh backbone: no hooks, no prompt machinery."""
    ref = load_backbone(BackboneSpec(**tiny_model(module.backbone.config.model_type))).eval()
    ref.load_state_dict(module.backbone.state_dict())
    return ref


def additive(mask2d, dtype=torch.float32):
    """(B, K) 1/0 -> (B, 1, 1, K) additive mask (0 attend, min blocked)."""
    return ((1.0 - mask2d[:, None, None, :].to(dtype)) * torch.finfo(dtype).min).to(dtype)


def shifted_decoder_inputs(config, ids, mask):
    """The decoder input of encoder-decoder classification: the input shifted right (BART's classifier)."""
    dec_mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask[:, :-1]], dim=1)
    start = torch.full_like(ids[:, :1], config.decoder_start_token_id)
    dec_ids = torch.cat([start, ids[:, :-1]], dim=1).masked_fill(dec_mask == 0, config.pad_token_id)
    return dec_ids, dec_mask


@torch.no_grad()
def reference(ref, arch, batch, prompt):
    """Hidden states of the real tokens (decoder states for encoder-decoders), by hand."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b = ids.shape[0]
    prompt = prompt[None].expand(b, -1, -1)
    joined_mask = torch.cat([mask.new_ones(b, P), mask], dim=1)  # every example sees its prompt
    if arch in ("bert", "roberta"):
        emb = ref.embeddings(input_ids=ids, token_type_ids=batch.get("token_type_ids"))
        out = ref.encoder(torch.cat([prompt, emb], dim=1), attention_mask=additive(joined_mask)).last_hidden_state
        return out[:, P:]
    if arch == "deberta-v2":
        emb = ref.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids), mask=mask)
        return ref.encoder(torch.cat([prompt, emb], dim=1), joined_mask).last_hidden_state[:, P:]
    if arch in ("gpt2", "llama"):
        embeds = torch.cat([prompt, ref.get_input_embeddings()(ids)], dim=1)
        positions = torch.cat([torch.zeros(P, dtype=torch.long), torch.arange(L)])[None].expand(b, -1)
        out = ref(inputs_embeds=embeds, attention_mask=joined_mask, position_ids=positions).last_hidden_state
        return out[:, P:]
    dec_ids, dec_mask = shifted_decoder_inputs(ref.config, ids, mask)
    if arch == "t5":  # no absolute positions: the encoder's relative bias covers the joined sequence
        embeds = torch.cat([prompt, ref.get_input_embeddings()(ids)], dim=1)
        return ref(inputs_embeds=embeds, attention_mask=joined_mask, decoder_input_ids=dec_ids,
                   decoder_attention_mask=dec_mask).last_hidden_state
    assert arch == "bart"  # learned positions 0..L-1 for the real tokens, none for the prompt
    enc = ref.encoder
    real = enc.embed_tokens(ids) + enc.embed_positions(ids)
    hidden = enc.layernorm_embedding(torch.cat([prompt, real], dim=1))
    for layer in enc.layers:
        hidden = layer(hidden, additive(joined_mask))
    return ref.decoder(input_ids=dec_ids, attention_mask=dec_mask, encoder_hidden_states=hidden,
                       encoder_attention_mask=joined_mask).last_hidden_state


@torch.no_grad()
def decoder_reference_via_cache(ref, batch, prompt):
    """Decoders, a second route with nothing to slice: the prompt's keys/values computed first
    (positions 0, as in training), then the real tokens alone at positions 0..L-1 on that cache."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b = ids.shape[0]
    cache = ref(inputs_embeds=prompt[None].expand(b, -1, -1), position_ids=torch.zeros(b, P, dtype=torch.long),
                use_cache=True).past_key_values
    return ref(input_ids=ids, attention_mask=torch.cat([mask.new_ones(b, P), mask], dim=1),
               position_ids=torch.arange(L)[None].expand(b, -1), past_key_values=cache).last_hidden_state


def agrees(a, b):
    return a.shape == b.shape and torch.allclose(a, b, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("name,arch", CASES)
def test_stripped_hidden_states_equal_hand_reference(name, arch):
    module = build(name, arch)
    batch = batch_for(arch)
    ref = reference_model(module)
    with torch.no_grad():
        prompt = module.prompt()
        got = module.encode(batch)
        want = reference(ref, arch, batch, prompt)
        bare = module.run_backbone(batch)  # no prompt at all
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    assert (bare - want).abs().max() > 1e-2, "the prompt does not matter: this test could not fail"
    if KIND[arch] == "decoder":
        torch.testing.assert_close(got, decoder_reference_via_cache(ref, batch, prompt), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_strip_that_drops_the_last_positions_is_caught(arch, monkeypatch):
    """The mutant the shape-only tests let through: drop the last P positions, not the first."""
    module = build("prompt_tuning", arch)
    batch = batch_for(arch)
    with torch.no_grad():
        want = reference(reference_model(module), arch, batch, module.prompt())
        assert agrees(module.encode(batch), want)
        monkeypatch.setattr(InputPrompt, "strip", lambda self, hidden, length: hidden[:, :hidden.shape[1] - length])
        mutated = module.encode(batch)
    assert mutated.shape[:2] == batch["input_ids"].shape or KIND[arch] == "encoder-decoder"
    assert not agrees(mutated, want)


def test_cases_cover_every_architecture_kind():
    assert {KIND[a] for _, a in CASES} == {"encoder", "decoder", "encoder-decoder"}
    assert set(TINY) <= {a for _, a in CASES}
