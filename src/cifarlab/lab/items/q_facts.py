"""Q1-Q4: model facts (convolutions, last linear input, parameters and gradient elements, optimizer state)."""

from __future__ import annotations

from typing import Any

from cifarlab.lab.context import Experiment, LabContext, PlannedRuns
from cifarlab.lab.sections import REF, REFERENCE
from cifarlab.model.facts import explain, inspect_model, one_image_gradients, structure_facts
from cifarlab.model.resnet import resnet18
from cifarlab.report.blocks import Block, Heading, Para, Table, num
from cifarlab.report.plots import ReportContext


def q_facts(ctx: LabContext) -> dict[str, Any]:


    facts = inspect_model(("sgd", "adam"), norm="batch")
    no_bn = structure_facts(resnet18(norm="none"))  # C7's model: parameters only (gradient elements = parameters)
    return {"facts": facts, "facts_no_bn": no_bn, "answers": [list(qa) for qa in explain(facts)],
            "one_image": one_image_gradients()}  # how the seed report's non-zero counts arise


def one_image_blocks(res: dict[str, Any]) -> list[Block]:
    """Q3: the one-image non-zero counts of both variants beside the element counts (labs from issue 11 on)."""
    one = res.get("one_image")
    if not one:
        return []
    rows = [[label, num(one[k]["gradient_elements"]), num(one[k]["nonzero"]),
             f"{one[k]['nonzero'] / one[k]['gradient_elements']:.1%}", ref]
            for label, k, ref in (("with BatchNorm", "batch", ""),
                                  ("without BatchNorm (C7's model)", "none",
                                   f"{num(REFERENCE['q3_nonzero_grads'])} of {num(REFERENCE['q3_params'])}"))]
    return [
        Table(["model", "gradient elements (= parameters)", "non-zero after one image", "share", REF], rows,
              csv="q3_one_image"),
        Para("A backward pass on a single image (seeded synthetic, SGD, training mode: BatchNorm needs only more "
             "than one value per channel, and the smallest map here is 4x4). The reference's 11,164,362 is the "
             "parameter count without BatchNorm, so its 8,920,240 non-zero entries come from that model after "
             "one image: without BatchNorm, ReLUs that are dead for that image zero whole slices of the "
             "gradient; with it, normalization keeps almost every entry non-zero. The count depends on the "
             "image and the initialization, never on the optimizer; the number of gradient elements is the "
             "number of parameters."),
    ]


def render_q(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    res = entry["result"]
    f, nb = res["facts"], res["facts_no_bn"]
    answers = {q.split()[0]: a for q, a in res["answers"]}
    by_kernel = ", ".join(f"{v} x {k}" for k, v in f["conv_layers_by_kernel"].items())
    sgd, adam = f["optimizers"]["sgd"], f["optimizers"]["adam"]

    def grad_rows(o: dict[str, Any], ref_nonzero: int) -> list[list[Any]]:
        return [
            ["trainable parameters", num(o["trainable_parameters"]), f"{num(REFERENCE['q3_params'])} (= our count without BN)"],
            ["gradient elements (after a real backward)", num(o["gradient_elements"]), ""],
            ["gradient tensors", num(o["gradient_tensors"]), ""],
            [f"non-zero gradient elements (batch of {o['backward_batch_size']})", num(o["gradient_nonzero_elements"]),
             num(ref_nonzero)],
            ["optimizer state elements", f"{num(o['optimizer_state_elements'])} ({o['optimizer_state_per_parameter']:.0f}x parameters)", ""],
        ]

    return [
        Heading("Q1 Convolutional layers", 3),
        Table(["fact", "ours"], [["Conv2d modules", f["conv_layers"]], ["by kernel", by_kernel],
                                 ["BatchNorm2d layers", f["batchnorm_layers"]]], csv="q1_convs"),
        Para(answers.get("Q1", "")),
        Heading("Q2 Input size of the last linear layer", 3),
        Table(["fact", "ours"], [["last Linear in_features", f["last_linear_in_features"]],
                                 ["last Linear out_features", f["last_linear_out_features"]]], csv="q2_linear"),
        Para(answers.get("Q2", "")),
        Heading("Q3 Parameters and gradients with SGD", 3),
        Table(["fact", "ours", REF], grad_rows(sgd, REFERENCE["q3_nonzero_grads"]), csv="q3_sgd"),
        Para(answers.get("Q3", "") + f" Without BatchNorm (C7's model): {num(nb['trainable_parameters'])} "
             f"parameters (so as many gradient elements), which is the reference's "
             f"parameter count. Forward cost: {f['forward_flops_per_image'] / 1e9:.3f} GFLOP per image."),
        *one_image_blocks(res),
        Heading("Q4 Parameters and gradients with Adam", 3),
        Table(["fact", "ours", REF], grad_rows(adam, REFERENCE["q4_nonzero_grads"]), csv="q4_adam"),
        Para(answers.get("Q4", "") + " The reference's 8,920,240 vs 8,896,249 are counts of non-zero entries, which "
             "depend on the batch (dead ReLUs), not on the optimizer; the number of gradient elements is the "
             "number of parameters for every optimizer."),
    ]


ITEM = Experiment("q", "Q1-Q4 Model facts", q_facts, render_q, lambda p, c: 1,
                  plan=lambda ctx: [PlannedRuns("none", 0, 0, note="one model inspection, not estimated")])
