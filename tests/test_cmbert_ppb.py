"""CM-BERT's pytorch_pretrained_bert replacement (deqfusion_compat.cmbert): no checkout needed."""
import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (./install.sh bert)")


def test_bert_adam_is_adamw_with_linear_warmup():
    from deqfusion_compat import cmbert as ppb

    p = torch.nn.Parameter(torch.zeros(3))
    opt = ppb.BertAdam([p], lr=1.0, warmup=0.25, t_total=8)
    lrs = []
    for _ in range(8):
        p.grad = torch.ones(3)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
    assert lrs[0] == 0.0 and lrs[2] == 1.0 and lrs[-1] < lrs[3]
    assert isinstance(opt, torch.optim.AdamW)
    with pytest.raises(EnvironmentError, match="--bert_model"):
        ppb.cached_path("bert-base-uncased")
