"""The lm-evaluation-harness adapter (`difflm.evaluate.lm_eval`): the ELBO estimator against exact
values, generation with stop strings, and whole runs of local tasks through `simple_evaluate`,
`difflm eval --tasks` and lm-eval's own command line, on tiny random LLaDA / Dream folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")  # the optional extra difflm[lmeval]

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import simple_parse_args_string  # noqa: E402

from difflm.cli import main  # noqa: E402
from difflm.errors import DifflmError  # noqa: E402
from difflm.evaluate.likelihood import continuation_elbo  # noqa: E402
from difflm.evaluate.lm_eval import DifflmLM, cut_at_stop  # noqa: E402
from difflm.pretrained import load_pretrained  # noqa: E402
from tests.test_published_families import MASK, WORDS, published_folder  # noqa: E402

SETTINGS = "gen_length=6,steps=6,block_length=3,mc_num=8,seed=7"
GEN_DOCS = [{"question": f"w{i} w{i + 1} w{i + 2}", "answer": f"w{i + 3}"} for i in range(3, 7)]
CHOICE_DOCS = [
    {"question": f"w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{i + 3} w{i + 4}", "w40"], "label": i % 3}
    for i in range(3, 7)
]


def write_tasks(root: Path) -> Path:
    """A folder of two lm-eval tasks over local JSONL files: tiny_gen (generate_until, stop at
    "w20", at most 5 tokens) and tiny_choice (multiple_choice, scored by loglikelihood)."""
    folder = root / "tasks"
    folder.mkdir()
    for name, docs in (("gen", GEN_DOCS), ("choice", CHOICE_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common.format(folder / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["w20"]\n  max_gen_toks: 5\nmetric_list:\n  - metric: exact_match\n'
    )
    (folder / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n" + common.format(folder / "choice.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return folder


@pytest.fixture(scope="module")
def llada_folder(tmp_path_factory) -> Path:
    return published_folder(tmp_path_factory.mktemp("llada"), "llada")


def lm_for(folder: Path, **settings) -> DifflmLM:
    return DifflmLM(
        str(folder), device="cpu", batch_size=4, **{**simple_parse_args_string(SETTINGS), **settings}
    )


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


@torch.no_grad()
def exact_log_p(model, context: list[int], token: int) -> tuple[float, bool]:
    """log p(token | context) from one forward on context + [mask], the mask token excluded (SUBS),
    and whether the token is the argmax there."""
    logits = model(torch.tensor([context + [MASK]]))[0, -1].double()  # [V]
    logits[MASK] = float("-inf")
    return float(logits.log_softmax(-1)[token]), int(logits.argmax()) == token


def loglikelihood(lm: DifflmLM, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    return lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])


def generate_until(lm: DifflmLM, requests: list[tuple[str, dict]]) -> list[str]:
    return lm.generate_until([Instance("generate_until", {}, r, i) for i, r in enumerate(requests)])


# ----------------------------------------------------------------------------- the estimator


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_one_token_loglikelihood_is_exact(tmp_path, family):
    """With one continuation token every draw masks it with weight 1: the ELBO is log p itself
    (Dream included: its logits shift lives inside the model)."""
    lm = lm_for(published_folder(tmp_path, family))
    (got, greedy), (longer, _) = loglikelihood(lm, [("w3 w4", " w5"), ("w3 w4", " w5 w6 w7")])
    expected, expected_greedy = exact_log_p(lm.pre.model, ids("w3 w4"), WORDS.index("w5"))
    assert got == pytest.approx(expected, abs=1e-5) and greedy == expected_greedy
    assert longer < 0


def test_elbo_converges_to_its_exact_expectation(mock_denoiser):
    """Two continuation tokens: E = 1/2 [(2 log p(a | ctx, b) + 2 log p(b | ctx, a)) / 2]
    + 1/2 [log p(a | ctx, masks) + log p(b | ctx, masks)], enumerated by hand."""
    model = mock_denoiser(vocab=32, seed=3)
    m, ctx, (a, b) = model.mask_token_id, [4, 9, 2], [7, 12]

    @torch.no_grad()
    def log_p(x: list[int], at: int, token: int) -> float:
        logits = model(torch.tensor([x]))[0, at].double()
        logits[m] = float("-inf")
        return float(logits.log_softmax(-1)[token])

    one = (2 * log_p(ctx + [m, b], 3, a) + 2 * log_p(ctx + [a, m], 4, b)) / 2
    both = log_p(ctx + [m, m], 3, a) + log_p(ctx + [m, m], 4, b)
    exact = (one + both) / 2
    estimate, _ = continuation_elbo(
        model, torch.tensor(ctx), torch.tensor([a, b]), samples=4000, batch_size=500,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert estimate == pytest.approx(exact, abs=0.1)  # ~5 standard errors; `one` and `both` differ by 1.3


def test_loglikelihood_is_deterministic_per_seed_and_independent_of_its_batch(llada_folder):
    pairs = [("w3 w4", " w5 w6 w7"), ("w8", " w9 w10")]
    first = loglikelihood(lm_for(llada_folder), pairs)
    assert loglikelihood(lm_for(llada_folder), pairs) == first
    assert loglikelihood(lm_for(llada_folder), pairs[1:]) == first[1:]  # alone, the same draws
    assert loglikelihood(lm_for(llada_folder, seed=8), pairs) != first


# ----------------------------------------------------------------------------- generation


def test_generation_stops_at_stop_strings_and_max_gen_toks(llada_folder):
    lm = lm_for(llada_folder)
    free = generate_until(lm, [("w3 w4 w5", {"until": []}), ("w9", {"until": []})])
    words = free[0].split()
    assert 2 <= len(words) <= 6 and all(w in WORDS for w in words)
    stop = words[len(words) // 2]
    cut = generate_until(lm, [("w3 w4 w5", {"until": ["w60", stop]}), ("w9", {"max_gen_toks": 2})])
    assert cut[0] == free[0][: free[0].index(stop)]
    assert len(cut[1].split()) <= 2
    assert generate_until(lm_for(llada_folder, seed=9), [("w3 w4 w5", {"until": []})]) == free[:1]  # greedy


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("a b. c\n\nd", ["\n\n", "."]) == "a b"
    assert cut_at_stop("a b", "z") == "a b" and cut_at_stop("a b", None) == "a b"


def test_bad_settings_and_rolling_loglikelihood_are_refused_in_one_line(llada_folder):
    with pytest.raises(DifflmError, match="unknown model_args foo"):
        DifflmLM(str(llada_folder), foo=1)
    with pytest.raises(DifflmError, match="mc_num must be >= 1"):
        lm_for(llada_folder, mc_num=0)
    with pytest.raises(DifflmError, match="'auto' is not supported"):
        DifflmLM(str(llada_folder), batch_size="auto")
    with pytest.raises(DifflmError, match="loglikelihood_rolling"):
        lm_for(llada_folder).loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("w3",), 0)])


def test_chat_template_is_the_tokenizer_one(tmp_path, llada_folder):
    lm = lm_for(llada_folder)
    assert lm.apply_chat_template([{"role": "user", "content": "w5 w6"}]) == "w0 w5 w6 w1"
    manager = TaskManager(include_path=str(write_tasks(tmp_path)), include_defaults=False)
    out = simple_evaluate(
        model=lm, tasks=["tiny_gen"], task_manager=manager, apply_chat_template=True, limit=1
    )
    assert out["samples"]["tiny_gen"][0]["arguments"][0][0] == "w0 w3 w4 w5 w1"  # the prompt lm-eval sent


# ----------------------------------------------------------------------------- whole runs


def test_simple_evaluate_runs_local_tasks_through_the_registered_model(tmp_path, llada_folder):
    """`difflm` resolves through lm-eval's registry; both tasks report metrics in [0, 1] that agree
    with the logged responses, and the one-token choices score exactly."""
    assert get_model("difflm") is DifflmLM
    manager = TaskManager(include_path=str(write_tasks(tmp_path)), include_defaults=False)
    out = simple_evaluate(
        model="difflm", model_args=f"pretrained={llada_folder},{SETTINGS}", device="cpu", batch_size=4,
        tasks=["tiny_gen", "tiny_choice"], task_manager=manager,
    )  # fmt: skip
    gen, choice = out["results"]["tiny_gen"], out["results"]["tiny_choice"]
    assert 0 <= gen["exact_match,none"] <= 1 and 0 <= choice["acc,none"] <= 1
    matches = []
    for sample in out["samples"]["tiny_gen"]:
        (text,) = sample["resps"][0]
        assert len(text.split()) <= 5 and "w20" not in text
        matches.append(text == sample["target"])
    assert gen["exact_match,none"] == pytest.approx(sum(matches) / len(matches))
    hits = []
    model = load_pretrained(llada_folder).model
    for sample in out["samples"]["tiny_choice"]:
        scores = [resp[0][0] for resp in sample["resps"]]
        hits.append(max(range(3), key=scores.__getitem__) == sample["doc"]["label"])
        token = WORDS.index(sample["doc"]["choices"][0])
        exact, _ = exact_log_p(model, ids(sample["doc"]["question"]), token)
        assert scores[0] == pytest.approx(exact, abs=1e-5)
    assert choice["acc,none"] == pytest.approx(sum(hits) / len(hits))


@pytest.mark.slow
def test_eval_command_runs_tasks(tmp_path, llada_folder, capsys):
    """`difflm eval DIR --tasks ...` (slow: lm-eval indexes its own ~15k tasks first)."""
    argv = ["eval", str(llada_folder), "--tasks", "tiny_gen,tiny_choice", "--include-path",
            str(write_tasks(tmp_path)), "--model-args", SETTINGS, "--batch-size", "4", "--json"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= results["tiny_gen"]["exact_match,none"] <= 1
    assert 0 <= results["tiny_choice"]["acc,none"] <= 1


@pytest.mark.slow
def test_lm_eval_command_line_sees_difflm(tmp_path, llada_folder):
    """`python -m difflm.evaluate.lm_eval` is lm-eval's CLI with `difflm` registered (slow: as above)."""
    argv = ["--model", "difflm", "--model_args", f"pretrained={llada_folder},{SETTINGS}", "--tasks",
            "tiny_choice", "--include_path", str(write_tasks(tmp_path)), "--device", "cpu", "--batch_size", "4",
            "--output_path", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "difflm.evaluate.lm_eval", *argv], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (written,) = (tmp_path / "out").rglob("results_*.json")
    assert 0 <= json.loads(written.read_text())["results"]["tiny_choice"]["acc,none"] <= 1


def test_lm_eval_stays_out_of_import_difflm_and_the_eval_help():
    code = "import sys, difflm; from difflm.cli import build_parser; build_parser('eval'); print('lm_eval' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
