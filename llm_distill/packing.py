"""Attention for packed micro-batches (`packing: true`) without a (tokens x tokens) mask.

transformers recognises packed rows by position ids that restart at 0 (with no attention_mask and no cache) and
keeps them apart: flash attention natively (varlen), sdpa and eager through a dense block-diagonal mask, whose
size and attention work grow with the square of the packed length (a 32-row micro-batch of ~60 tokens: 22x the
padded batch's attention work). `PACKED_SDPA` is sdpa that instead lays the packed rows out as a padded batch
for the attention product only, (1, H, L, d) -> (rows, H, longest, d), runs causal sdpa and packs the result
back: attention costs what it costs in a padded batch, every other layer runs on real tokens only. Calls that
are not packed (an attention_mask, a KV cache, generation) go to transformers' own sdpa unchanged.
"""

from __future__ import annotations

import torch

PACKED_SDPA = "llm_distill_packed_sdpa"


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query: (1, H, L, d), key/value: (1, H_kv, L, d) of packed rows with `position_ids` (1, L) restarting at 0.

    Returns (1, L, H, d) and no weights, as transformers' attention functions do."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    pos = kwargs.get("position_ids")
    if attention_mask is not None or pos is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] \
            or query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    pos = pos[0]  # (L,)
    row = (pos == 0).cumsum(0) - 1  # (L,) which packed row each position belongs to
    rows, longest = int(row[-1]) + 1, int(pos.max()) + 1

    def unpack(x):  # (1, h, L, d) -> (rows, h, longest, d), zeros after each row's end
        out = x.new_zeros(rows, longest, x.shape[1], x.shape[3])
        out[row, pos] = x[0].transpose(0, 1)
        return out.transpose(1, 2)

    q, k, v = unpack(query), unpack(repeat_kv(key, module.num_key_value_groups)), \
        unpack(repeat_kv(value, module.num_key_value_groups))
    # Right-padded rows under a causal mask: a real query only sees earlier positions of its own row.
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout if module.training else 0.0,
                                                           scale=scaling, is_causal=True)  # (rows, H, longest, d)
    return out.transpose(1, 2)[row, pos][None], None  # (1, L, H, d)


def _packed_mask(*args, attention_mask=None, **kwargs):
    """No mask for packed rows (the attention above keeps them apart); transformers' sdpa mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_packed_sdpa(model) -> bool:
    """Switch a student that uses sdpa to PACKED_SDPA (registered on first use); returns whether it did. Other
    implementations stay: flash attention is varlen already, eager keeps its (correct, slower) block mask. The
    choice is not written into a saved config."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, _packed_mask)
    model.set_attn_implementation(PACKED_SDPA)
    return model.config._attn_implementation == PACKED_SDPA
