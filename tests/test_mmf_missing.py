"""The per-sample modality mask a data set puts in MMF's sample list (deqfusion_adapters.mmf.missing; no MMF
needed): its two forms, and errors that name the field. The real model with it: integration_tests/test_mmf.py."""
import pytest
import torch

from deqfusion_adapters.mmf.missing import PRESENT_FIELD, modality_mask, zero_absent

MODS = ["image", "text", "audio"]


def test_no_field_means_every_modality_present():
    assert modality_mask({"image": torch.zeros(4, 3)}, MODS, 4) is None


def test_the_whole_mask_and_per_modality_fields_agree():
    whole = torch.tensor([[True, True, False], [False, True, True], [True, False, True]])
    assert torch.equal(modality_mask({PRESENT_FIELD: whole}, MODS, 3), whole)
    per = {"image_present": whole[:, 0], "text_present": whole[:, 1].int(), "audio_present": whole[:, 2]}
    assert torch.equal(modality_mask(per, MODS, 3), whole)
    # a modality without a field is present in every sample; 0/1 integers are accepted
    got = modality_mask({"text_present": torch.tensor([1, 0, 1])}, MODS, 3)
    assert torch.equal(got, torch.tensor([[True, True, True], [True, False, True], [True, True, True]]))


@pytest.mark.parametrize("fields, error, match", [
    ({PRESENT_FIELD: torch.ones(3, 2, dtype=torch.bool)}, ValueError, r"'modality_present': expected shape \[3, 3\]"),
    ({"text_present": torch.ones(2, dtype=torch.bool)}, ValueError, r"'text_present': expected shape \[3\]"),
    ({PRESENT_FIELD: torch.ones(3, 3)}, TypeError, r"'modality_present': expected bool"),
    ({"image_present": torch.tensor([0, 2, 1])}, TypeError, r"'image_present': expected bool"),
    ({PRESENT_FIELD: torch.ones(3, 3, dtype=torch.bool), "image_present": torch.ones(3, dtype=torch.bool)},
     ValueError, r"both 'modality_present' and 'image_present'"),
    ({PRESENT_FIELD: torch.tensor([[True] * 3, [False] * 3, [True] * 3])}, ValueError, r"samples \[1\] .* no modality"),
])
def test_bad_masks_name_the_field(fields, error, match):
    with pytest.raises(error, match=match):
        modality_mask(fields, MODS, 3)


def test_zero_absent_replaces_nan_rows_only():
    x = torch.tensor([[1.0, 2.0], [float("nan"), float("inf")], [3.0, 4.0]])
    out = zero_absent(x, torch.tensor([True, False, True]))
    assert torch.equal(out, torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]))
    images = torch.rand(2, 3, 4, 4)
    assert torch.equal(zero_absent(images, torch.tensor([False, True]))[1], images[1])
    assert zero_absent(images, torch.tensor([False, True]))[0].eq(0).all()
