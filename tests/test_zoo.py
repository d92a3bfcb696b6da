"""fxnumeric.zoo's MiniLM is transformers' BERT encoder, mean-pooled (checked on a tiny config)."""

from __future__ import annotations

import pytest
import torch

from fxnumeric.zoo import MiniLM


def test_minilm_computes_what_bert_computes() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = MiniLM(vocab=100, hidden=32, layers=2, heads=4, inner=64, positions=16).eval()
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=16, hidden_act="gelu")
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()
    missing, unexpected = bert.load_state_dict(ours.state_dict(), strict=False)
    assert missing == [] and unexpected == []
    ids = torch.randint(1, 100, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding is masked out of attention and of the mean
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        expected = (hidden * m).sum(1) / m.sum(1)
        assert torch.allclose(ours(ids, mask), expected, atol=1e-5)


def test_minilm_traces_with_fx() -> None:
    import torch.fx as fx

    model = MiniLM(vocab=50, hidden=16, layers=1, heads=2, inner=32, positions=8).eval()
    gm = fx.symbolic_trace(model)
    ids = torch.randint(1, 50, (2, 5))
    mask = torch.ones_like(ids)
    assert torch.equal(gm(ids, mask), model(ids, mask))
    assert "encoder.layer.0.output.dense" in dict(gm.named_modules())
