from cifarlab.model.facts import explain, inspect_model, one_image_gradients


def test_q1_to_q4_are_computed_from_the_model():
    facts = inspect_model(("sgd", "adam"), batch_size=4)
    assert facts["conv_layers"] == 20
    assert facts["conv_layers_by_kernel"] == {"3x3": 17, "1x1": 3}
    assert facts["batchnorm_layers"] == 20
    assert facts["last_linear_in_features"] == 512
    assert facts["trainable_parameters"] == 11_173_962
    assert facts["trainable_parameter_tensors"] == 62
    # ~0.556 GMAC forward per image (LAB.md); a training step is about 3x the forward
    assert 0.54e9 < facts["forward_macs_per_image"] < 0.57e9
    assert 2.9 < facts["train_flops_per_image"] / facts["forward_flops_per_image"] < 3.1
    sgd, adam = facts["optimizers"]["sgd"], facts["optimizers"]["adam"]
    for o in (sgd, adam):
        assert o["gradient_elements"] == 11_173_962  # elements, not the 62 tensors
        assert o["gradient_tensors"] == 62
        assert 0 < o["gradient_nonzero_elements"] <= o["gradient_elements"]
    assert sgd["optimizer_state_elements"] == 11_173_962  # one momentum buffer
    assert adam["optimizer_state_elements"] == 2 * 11_173_962  # exp_avg + exp_avg_sq
    assert set(adam["optimizer_state_by_buffer"]) == {"exp_avg", "exp_avg_sq"}
    text = " ".join(a for _, a in explain(facts))
    assert "17 3x3" in text and "3 1x1" in text and "11,173,962" in text


def test_no_batchnorm_facts():
    facts = inspect_model(("sgd",), norm="none", batch_size=2)
    assert facts["batchnorm_layers"] == 0
    assert facts["trainable_parameters"] == 11_164_362
    assert facts["optimizers"]["sgd"]["gradient_elements"] == 11_164_362


def test_one_image_is_a_valid_batch_for_both_variants():
    """Issue 11: BatchNorm in training mode needs more than one value per channel; the smallest map here is
    4x4, so a batch of one works, and the seed report's one-image non-zero counts can be reproduced."""
    counts = one_image_gradients()
    assert counts["batch"]["parameters"] == counts["batch"]["gradient_elements"] == 11_173_962
    assert counts["none"]["parameters"] == counts["none"]["gradient_elements"] == 11_164_362
    for c in counts.values():
        assert 0 < c["nonzero"] <= c["gradient_elements"]
    # without BatchNorm dead ReLUs zero whole filters' gradients for one image: far fewer non-zero entries
    assert counts["none"]["nonzero"] < 0.9 * counts["none"]["gradient_elements"]
    facts = inspect_model(("sgd",), norm="batch", batch_size=1)
    assert facts["optimizers"]["sgd"]["backward_batch_size"] == 1
