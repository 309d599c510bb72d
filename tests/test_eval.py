"""hovle.evaluate: TSV reading, prompts, answer extraction, metrics by hand, and `hovle eval` end to end."""

import argparse
import base64
import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from hovle import HoVLE, HoVLEConfig, load_tokenizer
from hovle.evaluate import (SPECS, TSVError, add_eval_parser, anls, build_prompt, circular_scores, evaluate_file,
                            extract_choice, extract_yes_no, mcq_scores, mme_scores, normalize_vqa_answer,
                            pope_scores, read_tsv, vqa_accuracy, vqa_scores)
from hovle.evaluate.data import Row, parse_answers, row_image
from hovle.evaluate.prompts import detect_type

FIXTURES = Path(__file__).parent / "fixtures"


# ---------------------------------------------------------------------------------------------------------
# yes / no, MME, POPE
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("Yes", "Yes"), ("no.", "No"), ("Yes, there is a dog.", "Yes"), ("NO", "No"), ("yes and no", "Unknown"),
    ("", "Unknown"), (None, "Unknown"), ("Nope", "Unknown"), ("I know", "Unknown"), ("yesterday", "Unknown"),
])
def test_extract_yes_no(text, want):
    assert extract_yes_no(text) == want


def _mme(cat, image, answer, pred):
    return {"category": cat, "image": image, "answer": answer, "prediction": pred}


def test_mme_acc_and_acc_plus_by_hand():
    records = [
        _mme("existence", "e1", "Yes", "Yes"), _mme("existence", "e1", "No", "No"),      # image right twice
        _mme("existence", "e2", "Yes", "Yes"), _mme("existence", "e2", "No", "Yes"),     # one wrong
        _mme("OCR", "o1", "Yes", "yes"), _mme("OCR", "o1", "No", "hmm"),                 # Unknown is wrong
        _mme("OCR", "o2", "Yes", "Yes"),                                                 # a lone question
        _mme("code_reasoning", "c1", "No", "No"), _mme("code_reasoning", "c1", "Yes", "No"),
    ]
    s = mme_scores(records)
    ex = s["categories"]["existence"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (75.0, 50.0, 125.0)
    ocr = s["categories"]["OCR"]
    assert ocr["acc"] == pytest.approx(200 / 3) and ocr["acc_plus"] == 50.0
    assert s["categories"]["code_reasoning"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0, "questions": 2,
                                                 "images": 2 - 1}
    assert s["perception"] == pytest.approx(125 + 200 / 3 + 50)
    assert s["cognition"] == 50.0 and s["perception_categories"] == 2 and s["cognition_categories"] == 1
    # the same image name in two categories is two images
    t = mme_scores([_mme("color", "x", "Yes", "Yes"), _mme("count", "x", "Yes", "No")])
    assert t["categories"]["color"]["acc_plus"] == 100.0 and t["categories"]["count"]["acc_plus"] == 0.0
    with pytest.raises(ValueError, match="yes/no answer expected"):
        mme_scores([_mme("color", "x", "maybe", "Yes")])


def _yn(answer, pred, cat="random"):
    return {"answer": answer, "prediction": pred, "category": cat}


def test_pope_scores_by_hand_and_zero_denominators():
    s = pope_scores([_yn("Yes", "Yes"), _yn("Yes", "No"), _yn("No", "Yes"), _yn("No", "No"), _yn("Yes", "???")])
    o = s["overall"]
    assert o["accuracy"] == 40.0 and o["precision"] == 50.0 and o["recall"] == pytest.approx(100 / 3)
    assert o["f1"] == pytest.approx(40.0) and o["yes_ratio"] == 40.0 and o["unknown"] == 1
    # never says yes: precision has a zero denominator -> 0, F1 0
    z = pope_scores([_yn("Yes", "No"), _yn("No", "No")])["overall"]
    assert (z["precision"], z["recall"], z["f1"], z["accuracy"], z["yes_ratio"]) == (0.0, 0.0, 0.0, 50.0, 0.0)
    # no positive in the gold answers: recall has a zero denominator -> 0
    z = pope_scores([_yn("No", "No"), _yn("No", "Yes")])["overall"]
    assert (z["precision"], z["recall"], z["f1"]) == (0.0, 0.0, 0.0)
    two = pope_scores([_yn("Yes", "Yes", "adversarial"), _yn("Yes", "No", "popular")])
    assert set(two["categories"]) == {"adversarial", "popular"}
    assert two["mean_f1"] == pytest.approx(50.0) and two["overall"]["f1"] == pytest.approx(200 / 3)


# ---------------------------------------------------------------------------------------------------------
# multiple choice
# ---------------------------------------------------------------------------------------------------------

OPTS = {"A": "a red apple", "B": "the blue sky", "C": "42", "D": "green grass"}


@pytest.mark.parametrize("text, want", [
    ("B", "B"), ("(C)", "C"), ("D.", "D"), ("B. the blue sky", "B"), ("C) 42", "C"), ("  A  ", "A"),
    ("The answer is B.", "B"), ("Answer: (D)", "D"), ("answer is C", "C"), ("I think it is option B here", "B"),
    ("the blue sky", "B"), ("It is a red apple.", "A"), ("42", "C"),
    ("A or B", None), ("no idea", None), ("", None), (None, None), ("E", None),
    ("A dog", None),  # "A" as an article, and no option text: unanswerable
])
def test_extract_choice(text, want):
    assert extract_choice(text, OPTS) == want


def _mc(index, answer, pred, cat="c1", l2="L"):
    return {"index": str(index), "answer": answer, "prediction": pred, "options": OPTS, "category": cat,
            "l2-category": l2}


def test_circular_eval_by_hand():
    rows = [
        _mc(1, "A", "A"), _mc(1_000_001, "B", "B"), _mc(2_000_001, "C", "C"), _mc(3_000_001, "D", "(D)"),  # right
        _mc(2, "A", "A", "c2"), _mc(1_000_002, "B", "C", "c2"),      # main right, one shift wrong -> wrong
        _mc(3, "C", "42", "c2"),                                     # no shifts (2-option style), right
        _mc(1_000_004, "A", "A", "c3"), _mc(4, "B", "nonsense", "c3"),  # order in file does not matter
    ]
    s = circular_scores(rows)
    assert s["questions"] == 4 and s["rows"] == 9
    assert s["accuracy"] == 50.0
    assert s["category"] == {"c1": 100.0, "c2": 50.0, "c3": 0.0}
    assert s["vanilla_accuracy"] == 75.0  # main rows 1, 2, 3 right, 4 wrong
    plain = mcq_scores(rows)
    assert plain["accuracy"] == pytest.approx(700 / 9) and plain["l2-category"] == {"L": pytest.approx(700 / 9)}


# ---------------------------------------------------------------------------------------------------------
# VQA normalisation, VQA accuracy, ANLS
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("Two", "2"), ("the cat", "cat"), ("A Dog.", "dog"), ("dont", "don't"), ("yes!", "yes"),
    ("1,000", "1000"), ("3.5", "3.5"), ("red-green", "red green"), ("hello , world", "hello world"),
    ("  Coca\nCola ", "coca cola"), ("an apple; a pear", "apple pear"), ("none", "0"), ("isnt", "isn't"),
])
def test_normalize_vqa_answer(text, want):
    assert normalize_vqa_answer(text) == want


def test_vqa_accuracy_official_leave_one_out():
    ten = ["stop"] * 3 + ["go"] * 7
    # each of the 10 subsets of 9: leaving out a "stop" leaves 2 matches (2/3), else 3 (1) -> (3*2/3 + 7)/10
    assert vqa_accuracy("Stop.", ten) == pytest.approx(0.9)
    assert vqa_accuracy("go", ten) == 1.0
    assert vqa_accuracy("stop", ["stop"] + ["go"] * 9) == pytest.approx(0.3)  # 9 subsets of 1/3, one of 0
    assert vqa_accuracy("walk", ten) == 0.0
    assert vqa_accuracy("Two", ["2"]) == 1.0  # one reference: normalised exact match
    s = vqa_scores([{"prediction": "go", "answers": ten, "category": "x"},
                    {"prediction": "stop", "answers": ten, "category": "y"}])
    assert s["accuracy"] == pytest.approx(95.0) and s["category"] == {"x": 100.0, "y": pytest.approx(90.0)}


def test_anls_by_hand():
    assert anls("hello", ["HELLO"]) == 1.0
    assert anls("hellp", ["hello"]) == pytest.approx(0.8)
    assert anls("ab", ["ac"]) == 0.0                       # NL = 0.5 reaches the threshold
    assert anls("abc", ["abd"]) == pytest.approx(2 / 3)    # NL = 1/3
    assert anls("xyz", ["nothing alike", "xyw"]) == pytest.approx(2 / 3)  # best reference counts
    assert anls("", [""]) == 1.0 and anls("", ["abc"]) == 0.0
    assert anls("  New   York ", ["new york"]) == 1.0
    assert vqa_scores([{"prediction": "hellp", "answers": ["hello"]}, {"prediction": "x", "answers": ["y"]}],
                      "anls")["anls"] == pytest.approx(40.0)


def test_parse_answers():
    assert parse_answers("['a', 'b']") == ["a", "b"]
    assert parse_answers('["x"]') == ["x"]
    assert parse_answers("[not a list") == ["[not a list"]
    assert parse_answers("plain") == ["plain"]


# ---------------------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------------------

def test_prompts():
    mme = Row({"index": "1", "question": "Is there a dog? Please answer yes or no."}, 2)
    assert build_prompt(mme, SPECS["mme"]) == ("Is there a dog? Please answer yes or no. "
                                               "Answer the question using a single word or phrase.")
    pope = Row({"index": "1", "question": "Is there a dog in the image?"}, 2)
    assert build_prompt(pope, SPECS["pope"]) == "Is there a dog in the image?"
    assert build_prompt(pope, SPECS["textvqa"]).endswith("?\nAnswer the question using a single word or phrase.")
    mc = Row({"index": "1", "question": "Which?", "hint": "Look.", "A": "x", "B": "y"}, 2)
    assert build_prompt(mc, SPECS["mmbench"]) == ("Look.\nWhich?\nA. x\nB. y\n"
                                                  "Answer with the option's letter from the given choices directly.")
    assert build_prompt(mc, SPECS["mcq"], "vlmevalkit") == (
        "Hint: Look.\nQuestion: Which?\nOptions:\nA. x\nB. y\nPlease select the correct answer from the options above. \n")
    cn = Row({"index": "1", "question": "哪个？", "A": "甲", "B": "乙", "C": "丙"}, 2)
    assert build_prompt(cn, SPECS["mmbench"]) == "哪个？\nA. 甲\nB. 乙\nC. 丙\n请直接回答选项字母。"


@pytest.mark.parametrize("name, kind", [
    ("MMBench_DEV_EN", "mmbench"), ("MMBench_DEV_CN_V11", "mmbench"), ("MME", "mme"), ("POPE", "pope"),
    ("SEEDBench_IMG", "mcq"), ("ScienceQA_TEST", "mcq"), ("AI2D_TEST", "mcq"), ("TextVQA_VAL", "textvqa"),
    ("DocVQA_VAL", "docvqa"), ("InfoVQA_VAL", "infovqa"), ("MMStar", None),
])
def test_detect_type(name, kind):
    assert detect_type(name) == kind


# ---------------------------------------------------------------------------------------------------------
# TSV files
# ---------------------------------------------------------------------------------------------------------

def png_b64(color, size=(40, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path: Path, columns: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:  # as pandas' to_csv(sep="\t") writes them
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(columns)
        w.writerows([["" if v is None else v for v in r] for r in rows])
    return path


def test_read_tsv_and_image_references(tmp_path):
    red = png_b64("red")
    p = write_tsv(tmp_path / "MME.tsv", ["index", "image", "question", "answer", "category"], [
        [0, red, "Is it red?\nPlease answer yes or no.", "Yes", "color"], [1, "0", "Is it blue?", "No", "color"]])
    t = read_tsv(p)
    assert [r.index for r in t.rows] == ["0", "1"] and t.rows[0].get("question") == "Is it red?\nPlease answer yes or no."
    assert row_image(t, t.rows[1]).getpixel((0, 0)) == (255, 0, 0)
    assert t.rows[1].line == 4  # the quoted newline makes row 0 two lines


def _cli(argv):
    parser = argparse.ArgumentParser(prog="hovle")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("columns, rows, message", [
    (["index", "image", "answer"], [[0, "x", "Yes"]], "missing column 'question'"),
    (["index", "image", "question", "answer"], [[0, "!!notbase64" * 10, "q", "Yes"]],
     "line 2 (index 0), column 'image': bad base64"),
    (["index", "image", "question", "answer"], [[0, base64.b64encode(b"not a png" * 10).decode(), "q", "Yes"]],
     "column 'image': base64 decodes to no readable image"),
    (["index", "image", "question", "answer"], [[0, "7", "q", "Yes"]], "'7' is neither base64 image data"),
    (["index", "image", "question", "answer"], [[0, "IMG", "q", "Maybe"]],
     "line 2 (index 0), column 'answer': expected Yes or No, got 'Maybe'"),
    (["index", "image", "question", "answer"], [[0, "IMG", "q"]], "line 2: 3 fields, the header has 4"),
    (["index", "image", "question", "answer"], [[0, "IMG", "q", "Yes"], [0, "IMG", "q", "No"]],
     "line 3, column 'index': duplicate index 0"),
    (["index", "question", "answer"], [[0, "q", "Yes"]], "missing column 'image'"),
])
def test_bad_tsv_is_one_clear_line(tmp_path, columns, rows, message):
    rows = [[png_b64("red") if v == "IMG" else v for v in r] for r in rows]
    p = write_tsv(tmp_path / "MME.tsv", columns, rows)
    model = TinyModelStub()
    with pytest.raises(TSVError) as e:
        evaluate_file(model, None, p, tmp_path / "out", model_name="m")
    assert message in str(e.value) and "\n" not in str(e.value) and str(p) in str(e.value)


def test_bad_mcq_answer_and_unknown_type(tmp_path):
    p = write_tsv(tmp_path / "AI2D_TEST.tsv", ["index", "image", "question", "A", "B", "answer"],
                  [[5, png_b64("red"), "q", "x", "y", "C"]])
    with pytest.raises(TSVError, match=r"line 2 \(index 5\), column 'answer': 'C' is not one of the options A, B"):
        evaluate_file(TinyModelStub(), None, p, tmp_path / "out", model_name="m")
    q = write_tsv(tmp_path / "Mystery.tsv", ["index", "image", "question"], [[0, png_b64("red"), "q"]])
    with pytest.raises(TSVError, match="pass --dataset-type"):
        _cli(["eval", "--model", str(tmp_path), "--data", str(q), "--out", str(tmp_path / "o")])


class TinyModelStub:
    """Enough of a model to reach the checks that run before any inference."""

    class config:
        tile_size, dynamic_image_size, min_dynamic_patch, use_thumbnail = 56, True, 1, True

    def chat(self, *a, **k):
        raise AssertionError("no inference expected")

    batch_chat = chat


# ---------------------------------------------------------------------------------------------------------
# end to end with a tiny random model
# ---------------------------------------------------------------------------------------------------------

def tiny_model():
    from dataclasses import replace

    cfg = HoVLEConfig.from_name("tiny")
    cfg = replace(cfg, embedding=replace(cfg.embedding, llm_vocab_size=609, img_context_token_id=602))
    return HoVLE.from_config(cfg.with_llm(vocab_size=609), seed=1)


class Counting:
    """Wraps a model and counts questions answered through chat / batch_chat."""

    def __init__(self, model):
        self.model, self.config, self.questions, self.batches = model, model.config, 0, []

    def chat(self, tok, pv, q, gen, **kw):
        self.questions += 1
        return self.model.chat(tok, pv, q, gen, **kw)

    def batch_chat(self, tok, pv, qs, gen, num_patches_list=None, **kw):
        self.questions += len(qs)
        self.batches.append(len(qs))
        return self.model.batch_chat(tok, pv, qs, gen, num_patches_list=num_patches_list, **kw)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FIXTURES / "tokenizer")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("tsv")
    r, g, b = png_b64("red", (60, 30)), png_b64("green", (30, 30)), png_b64("blue", (30, 70))
    return {
        "MME": write_tsv(d / "MME.tsv", ["index", "image", "question", "answer", "category"], [
            [0, r, "Is it red? Please answer yes or no.", "Yes", "color"],
            [1, "0", "Is it blue? Please answer yes or no.", "No", "color"],
            [2, g, "Is there text? Please answer yes or no.", "No", "code_reasoning"],
            [3, "2", "Is there code? Please answer yes or no.", "Yes", "code_reasoning"]]),
        "POPE": write_tsv(d / "POPE.tsv", ["index", "image", "question", "answer", "category"], [
            [0, r, "Is there a cat in the image?", "yes", "random"],
            [1, b, "Is there a dog in the image?", "no", "adversarial"],
            [2, g, "Is there a car in the image?", "no", "popular"]]),
        "MMBench_DEV_EN": write_tsv(d / "MMBench_DEV_EN.tsv",
                                    ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                                     "image", "l2-category", "split"], [
            [0, "Color?", "A plain image.", "red", "green", "", "", "A", "attr", r, "FP-S", "dev"],
            [1000000, "Color?", "A plain image.", "green", "red", "", "", "B", "attr", r, "FP-S", "dev"],
            [1, "Which shape?", "", "tall", "wide", "square", "round", "B", "shape", b, "FP-C", "dev"]]),
        "ScienceQA_TEST": write_tsv(d / "ScienceQA_TEST.tsv",
                                    ["index", "question", "hint", "A", "B", "C", "answer", "image", "category"], [
            [0, "Which is warmer?", "Context: two cups", "cup 1", "cup 2", "same", "C", g, "physics"]]),
        "TextVQA_VAL": write_tsv(d / "TextVQA_VAL.tsv", ["index", "image", "question", "answer"], [
            [0, r, "What does it say?", str(["stop"] * 3 + ["halt"] * 7)],
            [1, b, "What brand?", "['nike']"]]),
        "DocVQA_VAL": write_tsv(d / "DocVQA_VAL.tsv", ["index", "image", "question", "answer"], [
            [0, g, "What is the date?", "['1 May 1990', 'May 1, 1990']"],
            [1, b, "Who signed?", "['J. Smith']"]]),
    }


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


GEN = dict(max_new_tokens=3)


@pytest.mark.parametrize("name", ["MME", "POPE", "MMBench_DEV_EN", "ScienceQA_TEST", "TextVQA_VAL", "DocVQA_VAL"])
def test_end_to_end_resume_and_batch(model, tok, datasets, tmp_path, name):
    data = datasets[name]
    counted = Counting(model)
    first = evaluate_file(counted, tok, data, tmp_path / "seq", model_name="tiny", max_new_tokens=3, progress=False)
    n_rows = len(read_tsv(data).rows)
    assert counted.questions == n_rows
    preds = _csv(tmp_path / "seq" / f"tiny_{name}.csv")
    assert [p["index"] for p in preds] == [r.index for r in read_tsv(data).rows] and "image" not in preds[0]
    summary = json.loads((tmp_path / "seq" / f"tiny_{name}_score.json").read_text())
    assert summary["scores"] == first["scores"] and summary["rows"] == n_rows
    assert (tmp_path / "seq" / f"tiny_{name}_score.txt").read_text() == first["table"]

    # the scores are the metric functions applied to the written predictions
    spec = SPECS[summary["dataset_type"]]
    rows = {r.index: r for r in read_tsv(data).rows}
    if spec.metric == "mme":
        recs = [{"category": p["category"], "answer": p["answer"], "prediction": p["prediction"],
                 "image": {"0": "a", "1": "a", "2": "b", "3": "b"}[p["index"]]} for p in preds]
        assert summary["scores"] == json.loads(json.dumps(mme_scores(recs)))
    elif spec.metric == "pope":
        assert summary["scores"] == json.loads(json.dumps(pope_scores(preds)))
    elif spec.kind == "mcq":
        recs = [p | {"options": {k: rows[p["index"]].get(k) for k in "ABCD" if rows[p["index"]].get(k)}} for p in preds]
        fn = circular_scores if spec.metric == "circular" else mcq_scores
        assert summary["scores"] == json.loads(json.dumps(fn(recs)))
    else:
        recs = [{"prediction": p["prediction"], "answers": parse_answers(p["answer"])} for p in preds]
        assert summary["scores"] == json.loads(json.dumps(vqa_scores(recs, spec.metric)))

    # resume: a rerun asks nothing and gives the same result
    again = Counting(model)
    assert evaluate_file(again, tok, data, tmp_path / "seq", model_name="tiny", max_new_tokens=3,
                         progress=False)["scores"] == first["scores"]
    assert again.questions == 0

    # batched predictions equal the sequential ones
    batched = Counting(model)
    evaluate_file(batched, tok, data, tmp_path / "bat", model_name="tiny", max_new_tokens=3, batch_size=2,
                  progress=False)
    assert batched.batches and max(batched.batches) == min(2, n_rows)
    assert [p["prediction"] for p in _csv(tmp_path / "bat" / f"tiny_{name}.csv")] == [p["prediction"] for p in preds]


def test_resume_after_interruption_and_changed_settings(model, tok, datasets, tmp_path):
    data = datasets["POPE"]
    evaluate_file(Counting(model), tok, data, tmp_path, model_name="tiny", max_new_tokens=3, limit=2, progress=False)
    cache = tmp_path / "tiny_POPE.jsonl"
    with cache.open("a") as f:
        f.write('{"index": "2", "predic')  # a write cut short by a kill
    rest = Counting(model)
    evaluate_file(rest, tok, data, tmp_path, model_name="tiny", max_new_tokens=3, progress=False)
    assert rest.questions == 1
    with pytest.raises(TSVError, match="other settings.*max_new_tokens: 3 -> 5"):
        evaluate_file(rest, tok, data, tmp_path, model_name="tiny", max_new_tokens=5, progress=False)


def test_cli_eval(model, tok, datasets, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    for f in (FIXTURES / "tokenizer").iterdir():
        shutil.copy(f, ckpt)
    out = tmp_path / "out"
    _cli(["eval", "--model", str(ckpt), "--data", str(datasets["MME"]), "--data", str(datasets["POPE"]),
          "--out", str(out), "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "3", "--batch-size", "2"])
    printed = capsys.readouterr().out
    assert "ckpt on MME" in printed and "perception" in printed and "ckpt on POPE" in printed
    assert (out / "ckpt_MME_score.json").is_file() and (out / "ckpt_POPE.csv").is_file()
    with pytest.raises(TSVError, match="no such file"):
        _cli(["eval", "--model", str(ckpt), "--data", str(tmp_path / "MME.tsv"), "--out", str(out)])


class Oracle(TinyModelStub):
    """Replies from a prompt -> reply table, so the runner's scoring can be checked with known answers."""

    def __init__(self, replies):
        self.replies, self.questions = replies, 0

    def chat(self, tok, pv, q, gen, **kw):
        assert pv.shape[1:] == (3, 56, 56)
        self.questions += 1
        return self.replies[q]

    def batch_chat(self, tok, pv, qs, gen, num_patches_list=None, **kw):
        assert sum(num_patches_list) == pv.shape[0]
        return [self.chat(tok, pv, q, gen) for q in qs]


def test_known_answers_score_as_computed_by_hand(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (30, 30), "red").save(imgs / "a.png")
    Image.new("RGB", (30, 30), "blue").save(imgs / "b.png")
    mme = write_tsv(tmp_path / "MME.tsv", ["index", "image_path", "question", "answer", "category"], [
        [0, "a.png", "Red?", "Yes", "color"], [1, "a.png", "Blue?", "No", "color"],
        [2, "b.png", "Blue??", "Yes", "color"], [3, "b.png", "Red??", "No", "color"],
        [4, "a.png", "Code?", "Yes", "code_reasoning"], [5, "a.png", "Code??", "No", "code_reasoning"]])
    suffix = " Answer the question using a single word or phrase."
    replies = {"Red?": "Yes", "Blue?": "No.", "Blue??": "yes", "Red??": "Yes", "Code?": "Yes", "Code??": "no"}
    oracle = Oracle({q + suffix: a for q, a in replies.items()})
    with pytest.raises(TSVError, match="pass --image-root"):
        evaluate_file(oracle, None, mme, tmp_path / "out", model_name="o")
    s = evaluate_file(oracle, None, mme, tmp_path / "out", model_name="o", image_root=imgs, batch_size=4)["scores"]
    assert s["categories"]["color"]["acc"] == 75.0 and s["categories"]["color"]["acc_plus"] == 50.0
    assert s["perception"] == 125.0 and s["cognition"] == 200.0

    q, q2 = "Which color?", "Which colour?"
    mmb = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", ["index", "question", "A", "B", "answer", "image", "category"], [
        [0, q, "red", "blue", "A", png_b64("red"), "attr"], [1000000, q, "blue", "red", "B", "0", "attr"],
        [1, q2, "blue", "red", "B", png_b64("red"), "attr"], [1000001, q2, "red", "blue", "A", "1", "attr"]])
    tail = "\nAnswer with the option's letter from the given choices directly."
    oracle = Oracle({f"{q}\nA. red\nB. blue{tail}": "A", f"{q}\nA. blue\nB. red{tail}": "It is red.",
                     f"{q2}\nA. blue\nB. red{tail}": "(B)", f"{q2}\nA. red\nB. blue{tail}": "B"})
    s = evaluate_file(oracle, None, mmb, tmp_path / "out", model_name="o")["scores"]
    # question 0: "A" and "It is red." (= B) both right; question 1: "(B)" right, its shift's "B" wrong
    assert s["vanilla_accuracy"] == 100.0 and s["accuracy"] == 50.0
    rows = _csv(tmp_path / "out" / "o_MMBench_DEV_EN.csv")
    assert [r["extracted"] for r in rows] == ["A", "B", "B", "B"] and [r["hit"] for r in rows] == ["1", "1", "1", "0"]


def test_cli_checks_every_file_before_loading_the_model(tmp_path):
    good = write_tsv(tmp_path / "POPE.tsv", ["index", "image", "question", "answer"], [[0, png_b64("red"), "q", "yes"]])
    bad = write_tsv(tmp_path / "SEEDBench_IMG.tsv", ["index", "image", "question", "A", "B", "answer"],
                    [[0, png_b64("red"), "q", "x", "y", "A"], [1, "@@@" * 30, "q", "x", "y", "B"]])
    with pytest.raises(TSVError, match=r"SEEDBench_IMG.tsv: line 3 \(index 1\), column 'image': bad base64"):
        _cli(["eval", "--model", str(tmp_path / "not-a-model"), "--data", str(good), "--data", str(bad),
              "--out", str(tmp_path / "o")])
