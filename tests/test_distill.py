"""The distill pass: teacher, loss node, output pairing, formulas, modes, composition, errors."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from graphkd.passes.distill import Distill
from graphkd.passes.distill_loss import DistillLoss, TeacherCall, softmax_term
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import MappingKey

import graphkd as gk
from graphkd.errors import ConfigError, DistillError
from graphkd.graph import find_nodes, insert_on_weight, is_layer_node, layer_of, replace_module

MSE = {"pipeline": [{"pass": "distill", "type": "mse"}]}


def pipeline(**options) -> dict:
    return {"pipeline": [{"pass": "distill", **options}]}


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


class ThreeOutputs(nn.Module):
    """(xa, xb, xc) with xc computed under no_grad; ``nested`` returns {"a": xa, "bc": (xb, xc)}."""

    def __init__(self, nested: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 5)
        self.c = nn.Linear(4, 2)
        self.nested = nested

    def forward(self, x):
        xa, xb = self.a(x), self.b(x)
        with torch.no_grad():
            xc = self.c(x)
        return {"a": xa, "bc": (xb, xc)} if self.nested else (xa, xb, xc)


class WithIndices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        logits = self.fc(x)
        return logits, logits.argmax(1)


class NothingToDistill(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = self.fc(x)
        return h.detach(), h.argmax(1), 3


class Affine(nn.Module):
    """``x * w + b`` with per-element parameters: outputs any shape, student and teacher can
    differ freely once the student's parameters are perturbed."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape[1:]))
        self.b = nn.Parameter(torch.randn(shape[1:]))

    def forward(self, x):
        return x * self.w + self.b


class ReturnsLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        logits = self.fc(x)
        return logits, logits.pow(2).mean()


class HalveWeights(nn.Module):
    def forward(self, w):
        return w * 0.5


class HalveAllWeights(gk.Pass):
    """A stand-in for quantize/prune: rewrites every layer's weight edge of the student."""

    name = "test_halve_weights"

    def apply(self, gm, ctx):
        layers = [n for n in gm.graph.nodes if layer_of(gm, n) is not None]
        for node in layers:
            insert_on_weight(gm, node, f"halvers.{layer_of(gm, node)[0]}", HalveWeights())


class ShrinkHead(gk.Pass):
    """Changes the output shape (a broken pass, for the shape-mismatch error)."""

    name = "test_shrink_head"

    def apply(self, gm, ctx):
        replace_module(gm, "fc", nn.Linear(4, 3))


class ExtraOutput(gk.Pass):
    """Returns (output, output * 2) where the model returned one tensor (a broken pass)."""

    name = "test_extra_output"

    def apply(self, gm, ctx):
        (output,) = find_nodes(gm, op="output")
        result = output.args[0]
        with gm.graph.inserting_before(output):
            doubled = gm.graph.call_function(torch.mul, (result, 2))
        output.args = ((result, doubled),)


gk.register_pass(HalveAllWeights)
gk.register_pass(ShrinkHead)
gk.register_pass(ExtraOutput)


def reference_softmax_kd(s: torch.Tensor, t: torch.Tensor, temperature: float,
                         dim: int) -> torch.Tensor:
    """Soft-target cross-entropy written with explicit exp/log in float64, positions as rows."""
    classes = s.shape[dim]
    s = s.double().movedim(dim, -1).reshape(-1, classes) / temperature
    t = t.double().movedim(dim, -1).reshape(-1, classes) / temperature
    p_t = torch.exp(t - t.max(1, keepdim=True).values)
    p_t = p_t / p_t.sum(1, keepdim=True)
    log_p_s = s - s.max(1, keepdim=True).values
    log_p_s = log_p_s - torch.log(torch.exp(log_p_s).sum(1, keepdim=True))
    return -(p_t * log_p_s).sum() / s.shape[0] * temperature ** 2


def reference_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((s.double() - t.double()) ** 2).sum() / s.numel()


def teacher_calls(c: gk.Compressed) -> list[int]:
    calls = [0]
    c.teacher.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# --- training against a hand-written reference ------------------------------------------------

def test_ten_sgd_steps_match_hand_written_distillation():
    model = TwoConv()
    x = torch.randn(4, 3, 8, 8)
    c = gk.compress(model, MSE, x)
    ref_student = copy.deepcopy(model).train()
    ref_teacher = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.SGD(c.model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_student.parameters(), lr=0.1)
    losses = []
    for step in range(10):
        xs = torch.randn(4, 3, 8, 8)
        out, ref_out = c.model(xs), ref_student(xs)
        torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0, msg=f"step {step}")
        with torch.no_grad():
            target = ref_teacher(xs)
        loss, ref_loss = c.loss(), F.mse_loss(ref_out, target)
        assert abs(loss.item() - ref_loss.item()) <= 1e-6
        losses.append(loss.item())
        loss.backward()
        ref_loss.backward()
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    assert losses[0] > 1e-2  # BN in train vs eval mode makes the two models differ at the start
    assert losses[-1] < losses[0]
    teacher_state, original_state = c.teacher.state_dict().items(), model.state_dict().values()
    for (name, p), q in zip(teacher_state, original_state, strict=True):
        assert torch.equal(p, q), name
    assert all(not p.requires_grad for p in c.teacher.parameters())


# --- which outputs take part -------------------------------------------------------------------

def test_no_grad_output_is_left_out_of_the_loss():
    model, x = ThreeOutputs(), torch.randn(6, 4)
    c = gk.compress(model, MSE, x)
    with torch.no_grad():
        for p in c.model.parameters():
            p.add_(0.1)
    xa, xb, xc = c.model(x)
    ta, tb, _ = model(x)
    assert not xc.requires_grad
    expected = reference_mse(xa, ta) + reference_mse(xb, tb)
    assert c.loss().item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-7)
    stats = c.statistics()["distill"]
    assert stats["distilled"] == ["0", "1"]
    assert stats["excluded"] == {"2": "requires_grad=False (computed under no_grad or detached)"}


def test_no_grad_blocks_survive_tracing_and_restore_the_callers_mode():
    """The traced student keeps the model's no_grad block (else xc would be distilled), and a
    call under no_grad stays in no_grad after the block closes."""
    gm = gk.trace(ThreeOutputs(), torch.randn(2, 4))
    assert [o.requires_grad for o in gm(torch.randn(2, 4))] == [True, True, False]
    with torch.no_grad():
        assert [o.requires_grad for o in gm(torch.randn(2, 4))] == [False, False, False]
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


class _KeywordOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, *, scale: float = 2.0):
        return self.fc(x) * scale


def test_keyword_only_arguments_reach_the_teacher_by_keyword():
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    model = _KeywordOnly()
    c = gk.compress(model, {"pipeline": [{"pass": "distill", "type": "mse"}]}, x)
    with torch.no_grad():
        c.model.fc.weight.mul_(0.5)
    out = c.model(x, scale=3.0)
    expected = F.mse_loss(out, model(x, scale=3.0))
    torch.testing.assert_close(c.loss(), expected)


def test_nested_dict_outputs_are_paired_by_path():
    model, x = ThreeOutputs(nested=True), torch.randn(6, 4)
    c = gk.compress(model, MSE, x)
    with torch.no_grad():
        for p in c.model.parameters():
            p.add_(0.1)
    out = c.model(x)
    assert set(out) == {"a", "bc"} and len(out["bc"]) == 2
    t = model(x)
    expected = reference_mse(out["a"], t["a"]) + reference_mse(out["bc"][0], t["bc"][0])
    assert c.loss().item() == pytest.approx(expected.item(), rel=1e-6)
    assert c.statistics()["distill"]["distilled"] == ["a", "bc.0"]


def test_integer_outputs_are_excluded():
    model, x = WithIndices(), torch.randn(6, 4)
    c = gk.compress(model, MSE, x)
    with torch.no_grad():
        c.model.fc.bias.add_(1.0)
    logits, _ = c.model(x)
    assert c.loss().item() == pytest.approx(reference_mse(logits, model(x)[0]).item(), rel=1e-6)
    assert c.statistics()["distill"]["excluded"] == {
        "1": "integer dtype torch.int64, not floating point"}


def test_outputs_option_selects_paths_and_prefixes():
    model, x = ThreeOutputs(nested=True), torch.randn(6, 4)
    c = gk.compress(model, pipeline(type="mse", weight=3.0, outputs=["bc"]), x)
    with torch.no_grad():
        for p in c.model.parameters():
            p.add_(0.1)
    out = c.model(x)
    expected = 3.0 * reference_mse(out["bc"][0], model(x)["bc"][0])
    assert c.loss().item() == pytest.approx(expected.item(), rel=1e-6)
    stats = c.statistics()["distill"]
    assert stats["distilled"] == ["bc.0"]
    assert stats["excluded"] == {"a": "not listed in outputs",
                                 "bc.1": "requires_grad=False (computed under no_grad or detached)"}


def test_unknown_output_path_is_a_config_error_listing_the_real_ones():
    with pytest.raises(ConfigError) as err:
        gk.compress(ThreeOutputs(nested=True), pipeline(type="mse", outputs=["a", "b"]),
                    torch.randn(2, 4))
    assert str(err.value) == ("pipeline[0].outputs[1]: the model has no output 'b'; its output "
                              "paths are: a, bc.0, bc.1")


def test_listed_output_that_cannot_be_distilled_is_an_error():
    with pytest.raises(DistillError, match=r"output 'bc.1' is listed in outputs but cannot be "
                                           r"distilled: requires_grad=False"):
        gk.compress(ThreeOutputs(nested=True), pipeline(type="mse", outputs=["bc.1"]),
                    torch.randn(2, 4))


def test_no_eligible_output_lists_every_path_and_reason():
    with pytest.raises(DistillError) as err:
        gk.compress(NothingToDistill(), MSE, torch.randn(2, 4))
    message = str(err.value)
    assert "no output of the model can be distilled" in message
    assert ("'0': requires_grad=False (computed under no_grad or detached); "
            "'1': integer dtype torch.int64, not floating point; "
            "'2': not a tensor (int)") in message


def test_frozen_model_has_nothing_to_distill():
    model = nn.Linear(4, 3).requires_grad_(False)
    with pytest.raises(DistillError, match=r"'<output>': requires_grad=False"):
        gk.compress(model, MSE, torch.randn(2, 4))


def test_shape_mismatch_names_path_and_shapes():
    doc = {"pipeline": [{"pass": "test_shrink_head"}, {"pass": "distill", "type": "mse"}]}
    with pytest.raises(DistillError) as err:
        gk.compress(WithIndices(), doc, torch.randn(2, 4))
    assert "output '0' has shape (2, 3) in the student but (2, 5) in the teacher" in str(err.value)


def test_output_missing_in_the_teacher_names_the_teacher_paths():
    doc = {"pipeline": [{"pass": "test_extra_output"}, {"pass": "distill", "type": "mse"}]}
    with pytest.raises(DistillError, match=r"output '0' is a tensor in the student but missing in "
                                           r"the teacher \(teacher output paths: <output>\)"):
        gk.compress(nn.Linear(4, 3), doc, torch.randn(2, 4))


def test_output_structure_changing_at_run_time_is_an_error():
    loss = DistillLoss("mse", [(MappingKey("logits"),)])
    s = {"logits": torch.randn(2, 3, requires_grad=True)}
    with pytest.raises(DistillError, match=r"the teacher output has no path 'logits' in this "
                                           r"forward \(KeyError"):
        loss(s, {"scores": torch.randn(2, 3)})


def test_softmax_needs_the_class_dimension():
    with pytest.raises(DistillError, match=r"output '<output>' of shape \(2, 3\) has no dimension "
                                           r"dim=2 to take the softmax over"):
        gk.compress(nn.Linear(4, 3), pipeline(type="softmax", dim=2), torch.randn(2, 4))


def test_scalar_output_warns_that_it_looks_like_a_loss():
    with pytest.warns(UserWarning, match=r"output '1' is a 0-dim tensor: the model seems to "
                                         r"return a loss\. Return predictions, not losses"):
        gk.compress(ReturnsLoss(), MSE, torch.randn(2, 4))


# --- loss formulas -----------------------------------------------------------------------------

@pytest.mark.parametrize("options, shape, dim", [
    ({"type": "mse"}, (4, 6), 1),
    ({"type": "mse", "weight": 10.0}, (4, 6), 1),
    ({"type": "softmax"}, (4, 6), 1),
    ({"type": "softmax", "temperature": 5.0}, (4, 6), 1),
    ({"type": "softmax", "temperature": 5.0, "weight": 2.0}, (4, 6), 1),
    ({"type": "softmax", "weight": 2.0}, (2, 6, 3, 3), 1),
    ({"type": "softmax", "temperature": 5.0}, (2, 6, 3, 3), 1),
    ({"type": "softmax", "temperature": 2.0, "dim": -1}, (2, 5, 7), -1),
])
def test_loss_matches_independent_reference(options, shape, dim):
    model, x = Affine(shape), torch.randn(shape)
    c = gk.compress(model, pipeline(**options), x)
    with torch.no_grad():
        for p in c.model.parameters():
            p.add_(torch.randn_like(p))
    out, target = c.model(x), model(x).detach()
    if options["type"] == "mse":
        term = reference_mse(out, target)
    else:
        term = reference_softmax_kd(out, target, options.get("temperature", 1.0), dim)
    expected = options.get("weight", 1.0) * term
    assert c.loss().item() == pytest.approx(expected.item(), rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 4), classes=st.integers(2, 6), spatial=st.integers(1, 3),
       temperature=st.floats(0.5, 8.0), seed=st.integers(0, 2 ** 16))
def test_softmax_gradient_is_scaled_probability_difference(n, classes, spatial, temperature, seed):
    """d/ds of the T^2-scaled soft cross-entropy is T (softmax(s/T) - softmax(t/T)) / positions."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, classes, spatial, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(n, classes, spatial, generator=g, dtype=torch.float64)
    softmax_term(s, t, temperature, 1).backward()
    positions = n * spatial
    expected = temperature * (torch.softmax(s.detach() / temperature, 1)
                              - torch.softmax(t / temperature, 1)) / positions
    torch.testing.assert_close(s.grad, expected, rtol=1e-9, atol=1e-12)


# --- modes, teacher isolation --------------------------------------------------------------------

def test_eval_forward_runs_no_teacher_and_clears_the_loss():
    x = torch.randn(4, 3, 8, 8)
    c = gk.compress(TwoConv(), MSE, x)
    calls = teacher_calls(c)
    c.model(x)
    first, second = c.loss(), c.loss()
    assert calls[0] == 1 and first is second and first.item() > 0
    c.model.eval()
    out = c.model(x)
    assert calls[0] == 1
    assert c.loss().item() == 0.0 and c.loss().shape == ()
    assert out.shape == (4, 4, 6, 6)
    c.model.train()
    with torch.no_grad():
        c.model(x)
    assert calls[0] == 1 and c.loss().item() == 0.0


def test_outputs_frozen_after_compress_stop_taking_part():
    model, x = ThreeOutputs(nested=True), torch.randn(6, 4)
    c = gk.compress(model, MSE, x)
    with torch.no_grad():
        for p in c.model.parameters():
            p.add_(0.1)
    c.model.a.requires_grad_(False)
    out = c.model(x)
    assert c.loss().item() == pytest.approx(reference_mse(out["bc"][0], model(x)["bc"][0]).item(),
                                            rel=1e-6)
    c.model.requires_grad_(False)
    c.model(x)
    assert c.loss().item() == 0.0


def test_student_output_is_unchanged_by_the_pass():
    model, x = ThreeOutputs(nested=True), torch.randn(3, 4)
    c = gk.compress(model, MSE, x)
    out, ref = c.model(x), model(x)
    assert list(out) == ["a", "bc"]
    leaves = torch.utils._pytree.tree_leaves
    for got, want in zip(leaves(out), leaves(ref), strict=True):
        assert torch.equal(got, want)


def test_teacher_is_outside_state_dict_and_stays_frozen_in_eval():
    model, x = TwoConv(), torch.randn(4, 3, 8, 8)
    c = gk.compress(model, MSE, x)
    assert list(c.model.state_dict()) == list(model.state_dict())
    c.model.load_state_dict(model.state_dict())  # strict: no teacher keys expected
    assert all(not n.startswith("teacher") for n, _ in c.model.named_parameters())
    c.model.train()
    assert not any(m.training for m in c.teacher.modules())
    bn_before = {k: v.clone() for k, v in c.teacher.bn.state_dict().items()}
    opt = torch.optim.SGD(c.model.parameters(), lr=0.1)
    for _ in range(3):
        c.model(torch.randn(4, 3, 8, 8))
        c.loss().backward()
        opt.step()
    for key, value in c.teacher.bn.state_dict().items():
        assert torch.equal(value, bn_before[key]), key
    assert c.model.bn.num_batches_tracked.item() == 3


def test_pass_time_validation_leaves_student_state_and_rng_untouched():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    rng = torch.get_rng_state()
    c = gk.compress(model, MSE, x)
    assert torch.equal(torch.get_rng_state(), rng)
    student_state, original_state = c.model.state_dict().items(), model.state_dict().values()
    for (key, got), want in zip(student_state, original_state, strict=True):
        assert torch.equal(got, want), key
    assert c.model.training


def test_batch_of_one_falls_back_to_eval_mode_validation():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    c = gk.compress(model, MSE, torch.randn(1, 4))
    assert c.statistics()["distill"]["distilled"] == ["<output>"]
    c.model(torch.randn(4, 4))
    assert c.loss().item() > 0


def test_double_moves_the_teacher_too():
    model, x = TwoConv(), torch.randn(4, 3, 8, 8)
    c = gk.compress(model, MSE, x)
    c.model.double()
    assert all(p.dtype == torch.float64 for p in c.teacher.parameters())
    assert c.teacher.bn.running_mean.dtype == torch.float64
    xd = x.double()
    out = c.model(xd)
    expected = reference_mse(out, copy.deepcopy(model).double().eval()(xd))
    assert c.loss().dtype == torch.float64
    assert c.loss().item() == pytest.approx(expected.item(), rel=1e-12)


def test_nodes_survive_dead_code_elimination_and_export_removes_them():
    model, x = TwoConv(), torch.randn(4, 3, 8, 8)
    c = gk.compress(model, MSE, x)
    c.model.graph.eliminate_dead_code()
    c.model.recompile()
    kinds = [type(c.model.get_submodule(n.target)) for n in find_nodes(c.model, op="call_module")]
    assert kinds.count(TeacherCall) == 1 and kinds.count(DistillLoss) == 1
    c.model(x)  # a training forward leaves a loss tensor behind: export must still deepcopy
    exported = c.export()
    names = {name for name, _ in exported.named_modules()}
    assert "teacher" not in names and "distill_loss" not in names
    c.model.eval()
    assert torch.equal(exported(x), c.model(x))
    assert c.model.get_submodule("teacher").teacher is c.teacher


def test_deepcopy_and_pickle_keep_a_working_teacher():
    model, x = TwoConv(), torch.randn(4, 3, 8, 8)
    c = gk.compress(model, MSE, x)
    c.model(x)
    loss = c.loss().item()
    for clone in (copy.deepcopy(c.model), pickle.loads(pickle.dumps(c.model))):
        teacher = clone.get_submodule("teacher").teacher
        assert teacher is not c.teacher and not teacher.training
        assert clone.get_submodule("distill_loss").last_loss is None
        clone(x)
        assert clone.get_submodule("distill_loss").last_loss.item() == pytest.approx(loss, rel=1e-6)
        assert list(clone.state_dict()) == list(model.state_dict())


# --- composition with other passes ---------------------------------------------------------------

@pytest.mark.parametrize("order", [("test_halve_weights", "distill"),
                                   ("distill", "test_halve_weights")])
def test_teacher_is_the_original_whatever_rewrites_the_student(order):
    model, x = TwoConv().eval(), torch.randn(4, 3, 8, 8)
    halved = copy.deepcopy(model)
    with torch.no_grad():
        for conv in (halved.conv1, halved.conv2):
            conv.weight.mul_(0.5)
    doc = {"pipeline": [{"pass": p, "type": "mse"} if p == "distill" else {"pass": p}
                        for p in order]}
    c = gk.compress(model, doc, x)
    c.model.train()
    assert sum(is_layer_node(n) for n in c.model.graph.nodes) == 2
    assert torch.equal(c.teacher(x), model(x))
    out = c.model(x)
    torch.testing.assert_close(out, halved.train()(x), rtol=1e-6, atol=1e-6)
    assert c.loss().item() == pytest.approx(reference_mse(out, model(x)).item(), rel=1e-6)
    assert not any(isinstance(m, HalveWeights) for m in c.teacher.modules())


def test_two_distill_passes_share_one_teacher_forward():
    model, x = ThreeOutputs(nested=True), torch.randn(6, 4)
    doc = {"pipeline": [{"pass": "distill", "type": "mse", "outputs": ["a"]},
                        {"pass": "distill", "type": "softmax", "temperature": 2.0,
                         "outputs": ["bc.0"]}]}
    c = gk.compress(model, doc, x)
    calls = teacher_calls(c)
    assert len([n for n in c.model.graph.nodes if n.target == "teacher"]) == 1
    with torch.no_grad():
        for p in c.model.parameters():
            p.add_(0.1)
    out, t = c.model(x), model(x)
    expected = (reference_mse(out["a"], t["a"])
                + reference_softmax_kd(out["bc"][0], t["bc"][0], 2.0, 1))
    assert calls[0] == 1
    assert set(c.statistics()) == {"distill", "distill_1"}
    assert c.loss().item() == pytest.approx(expected.item(), rel=1e-6)


# --- options and configs -------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({}, "pipeline[0]: missing required option 'type' of pass 'distill'"),
    ({"type": "kl"}, "pipeline[0].type: must be one of 'mse', 'softmax', got \"kl\" (str)"),
    ({"type": "mse", "temperature": 2.0},
     "pipeline[0].temperature: applies to type 'softmax' only; remove it or use type: softmax"),
    ({"type": "softmax", "temperature": 0.0},
     "pipeline[0].temperature: must be a finite number > 0, got 0.0"),
    ({"type": "mse", "weight": -1.0}, "pipeline[0].weight: must be a finite number >= 0, got -1.0"),
    ({"type": "mse", "outputs": []}, "pipeline[0].outputs: must name at least one output path"),
])
def test_invalid_options_are_config_errors(options, message):
    with pytest.raises(ConfigError) as err:
        gk.Pipeline.from_dict(pipeline(**options))
    assert str(err.value).startswith(message)


def test_nncf_knowledge_distillation_section_is_translated():
    doc = {"compression": [{"algorithm": "knowledge_distillation", "type": "softmax",
                            "scale": 2.5, "temperature": 3.0}]}
    (kd,) = gk.Pipeline.from_dict(doc).passes
    assert isinstance(kd, Distill)
    assert (kd.loss_type, kd.weight, kd.temperature, kd.dim) == ("softmax", 2.5, 3.0, 1)


def test_nncf_temperature_with_mse_is_refused_at_its_path():
    doc = {"compression": [{"algorithm": "knowledge_distillation", "type": "mse",
                            "temperature": 2.0}]}
    with pytest.raises(ConfigError) as err:
        gk.Pipeline.from_dict(doc)
    assert str(err.value).startswith("compression[0].temperature: applies to type 'softmax' only")
