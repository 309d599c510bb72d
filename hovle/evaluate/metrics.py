"""Benchmark metrics that need no LLM judge. All scores are percentages (0-100) unless named otherwise.

Each function takes plain Python records so it can be tested by hand; `score_records` dispatches by metric.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

# ---------------------------------------------------------------------------------------------------------
# yes / no
# ---------------------------------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def extract_yes_no(prediction: str | None) -> str:
    """"Yes", "No" or "Unknown": yes/no as a word (case-insensitive), and only one of the two."""
    words = set(re.findall(r"[a-z]+", (prediction or "").lower()))
    yes, no = "yes" in words, "no" in words
    if yes and not no:
        return "Yes"
    if no and not yes:
        return "No"
    return "Unknown"


def _norm_yes_no(answer: str) -> str:
    a = answer.strip().lower()
    if a not in ("yes", "no"):
        raise ValueError(f"yes/no answer expected, got {answer!r}")
    return a.capitalize()


def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0


def mme_scores(records: Iterable[dict]) -> dict:
    """records: {category, image, answer, prediction}. Per category: acc (% questions right), acc_plus
    (% images with every question right), score = acc + acc_plus; perception/cognition = sums of scores."""
    questions: dict[str, list[bool]] = defaultdict(list)
    images: dict[str, dict[str, bool]] = defaultdict(dict)
    for r in records:
        ok = extract_yes_no(r["prediction"]) == _norm_yes_no(r["answer"])
        cat = r["category"]
        questions[cat].append(ok)
        images[cat][r["image"]] = images[cat].get(r["image"], True) and ok
    per_cat = {}
    for cat in sorted(questions):
        acc = _pct(sum(questions[cat]), len(questions[cat]))
        acc_plus = _pct(sum(images[cat].values()), len(images[cat]))
        per_cat[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": len(questions[cat]),
                        "images": len(images[cat])}
    out = {"categories": per_cat}
    for group, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [c for c in names if c in per_cat]
        out[group] = sum(per_cat[c]["score"] for c in present)
        out[f"{group}_categories"] = len(present)
    out["total"] = out["perception"] + out["cognition"]
    return out


def binary_scores(records: Sequence[dict]) -> dict:
    """POPE-style scores with "Yes" as the positive class; an Unknown reply is wrong and predicts "not yes".
    A zero denominator gives 0."""
    tp = fp = fn = tn = yes = correct = 0
    for r in records:
        pred, gold = extract_yes_no(r["prediction"]), _norm_yes_no(r["answer"])
        correct += pred == gold
        yes += pred == "Yes"
        if gold == "Yes":
            tp += pred == "Yes"
            fn += pred != "Yes"
        else:
            fp += pred == "Yes"
            tn += pred == "No"
    precision, recall = _pct(tp, tp + fp), _pct(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": _pct(correct, len(records)), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": _pct(yes, len(records)), "unknown": sum(extract_yes_no(r["prediction"]) == "Unknown"
                                                                  for r in records), "questions": len(records)}


def pope_scores(records: Sequence[dict]) -> dict:
    """Overall and per category (adversarial / popular / random) binary scores, plus the mean of the
    per-category F1 and accuracy (papers report one of these; see docs/evaluation.md)."""
    by_cat = defaultdict(list)
    for r in records:
        by_cat[r.get("category") or "all"].append(r)
    cats = {c: binary_scores(rs) for c, rs in sorted(by_cat.items())}
    return {"overall": binary_scores(records), "categories": cats,
            "mean_f1": sum(c["f1"] for c in cats.values()) / len(cats) if cats else 0.0,
            "mean_accuracy": sum(c["accuracy"] for c in cats.values()) / len(cats) if cats else 0.0}


def yes_no_scores(records: Sequence[dict]) -> dict:
    return _accuracy_by_category(records, lambda r: extract_yes_no(r["prediction"]) == _norm_yes_no(r["answer"]))


def _accuracy_by_category(records: Sequence[dict], right, extra_keys=("category",)) -> dict:
    oks = [(r, bool(right(r))) for r in records]
    out = {"accuracy": _pct(sum(ok for _, ok in oks), len(oks)), "questions": len(oks)}
    for key in extra_keys:
        groups = defaultdict(list)
        for r, ok in oks:
            if r.get(key) is not None:
                groups[r[key]].append(ok)
        if groups:
            out[key] = {k: _pct(sum(v), len(v)) for k, v in sorted(groups.items())}
    return out


# ---------------------------------------------------------------------------------------------------------
# multiple choice
# ---------------------------------------------------------------------------------------------------------

def _clean(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


_ARTICLE_A = re.compile(r"A\s+(?!(?:or|and|is|was|seems|looks)\b)[a-z]")


def extract_choice(prediction: str | None, options: dict[str, str]) -> str | None:
    """The option letter a free-text reply picks, or None when it cannot be told without a judge.

    In order: a bare letter ("B", "(B)", "B.", "B) text"); "answer is B" / "Answer: (B)"; exactly one
    option letter standing alone in the text (an "A" followed by a lower-case word other than or/and/is/was/
    seems/looks is read as the article);
    the reply equal to one option's text; exactly one option's text contained in the reply.
    """
    text = (prediction or "").strip()
    if not text or not options:
        return None
    letters = "".join(options)
    m = re.fullmatch(rf"[\(\[]?([{letters}])[\)\]]?[.:]?", text)
    if m:
        return m.group(1)
    m = re.match(rf"[\(\[]([{letters}])[\)\]]|([{letters}])[\).:](?:\s|$)", text)  # "(B) ...", "B. ...", "B) ..."
    if m:
        return m.group(1) or m.group(2)
    m = re.search(rf"answer\s*(?:is|:)?\s*:?\s*[\(\[]?([{letters}])(?![A-Za-z])", text, re.IGNORECASE)
    if m and m.group(1).isupper():
        return m.group(1)
    found = set()
    for m in re.finditer(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z'])", text):
        if m.group(1) == "A" and _ARTICLE_A.match(text, m.start()):
            continue
        found.add(m.group(1))
    if len(found) == 1:
        return found.pop()
    if found:
        return None  # several letters: ambiguous
    reply = _clean(text)
    cleaned = {k: _clean(v) for k, v in options.items()}
    exact = [k for k, v in cleaned.items() if v and v == reply]
    if len(exact) == 1:
        return exact[0]
    contained = [k for k, v in cleaned.items() if v and re.search(rf"(?<!\w){re.escape(v)}(?!\w)", reply)]
    if len(contained) == 1:
        return contained[0]
    return None


def mcq_scores(records: Sequence[dict]) -> dict:
    """records: {prediction, answer (letter), options, category?, l2-category?}. Plain accuracy."""
    return _accuracy_by_category(
        records, lambda r: extract_choice(r["prediction"], r["options"]) == r["answer"].strip(),
        extra_keys=("category", "l2-category"))


def circular_scores(records: Sequence[dict]) -> dict:
    """MMBench CircularEval: rows whose int(index) % 1_000_000 agree are the circular shifts of one question;
    the question counts as right only if every shift is. Categories are the main (smallest-index) row's."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        groups[int(r["index"]) % 1_000_000].append(r)
    merged = []
    for key in sorted(groups):
        rows = sorted(groups[key], key=lambda r: int(r["index"]))
        ok = all(extract_choice(r["prediction"], r["options"]) == r["answer"].strip() for r in rows)
        merged.append({**rows[0], "ok": ok, "shifts": len(rows)})
    out = _accuracy_by_category(merged, lambda r: r["ok"], extra_keys=("category", "l2-category"))
    out["questions"] = len(merged)
    out["rows"] = len(records)
    out["vanilla_accuracy"] = mcq_scores([r for r in records if int(r["index"]) < 1_000_000])["accuracy"]
    return out


# ---------------------------------------------------------------------------------------------------------
# VQA: the official VQA answer processing and accuracy; ANLS
# ---------------------------------------------------------------------------------------------------------

_CONTRACTIONS_RAW = """aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've
hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's
Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's
maam:ma'am mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't
mustve:must've neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've
someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd thered've:there'd've
there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've
theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've
werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's
whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll
whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've
yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've
youd:you'd youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've"""
CONTRACTIONS = dict(item.split(":", 1) for item in _CONTRACTIONS_RAW.split())
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official script's pattern, kept for parity
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA evaluation's answer processing (as VLMEvalKit applies it, to every answer):
    newlines/tabs to spaces, punctuation removed or spaced, number words to digits, articles dropped,
    contractions restored ("dont" -> "don't"), lower case."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy in [0, 1]: the mean over the len(answers) leave-one-out subsets of
    min(1, #matching human answers in the subset / 3). With one reference answer: exact match."""
    if not answers:
        raise ValueError("no reference answers")
    pred = normalize_vqa_answer(prediction or "")
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) == 1:
        return float(gts[0] == pred)
    accs = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one question in [0, 1]: max over references of 1 - NL, where NL is the Levenshtein distance
    of the lower-cased, whitespace-collapsed strings over the longer length; NL >= threshold scores 0."""
    if not answers:
        raise ValueError("no reference answers")
    pred = " ".join((prediction or "").lower().split())
    best = 0.0
    for a in answers:
        gt = " ".join(a.lower().split())
        longest = max(len(gt), len(pred))
        nl = levenshtein(gt, pred) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def vqa_scores(records: Sequence[dict], metric: str = "vqa") -> dict:
    """records: {prediction, answers: [str], category?}. Mean VQA accuracy or ANLS, in percent."""
    fn = vqa_accuracy if metric == "vqa" else anls
    vals = [(r, fn(r["prediction"], r["answers"])) for r in records]
    out = {metric if metric == "anls" else "accuracy": _pct(sum(v for _, v in vals), len(vals)),
           "questions": len(vals)}
    cats = defaultdict(list)
    for r, v in vals:
        if r.get("category") is not None:
            cats[r["category"]].append(v)
    if cats:
        out["category"] = {k: _pct(sum(v), len(v)) for k, v in sorted(cats.items())}
    return out


def headline(metric: str, scores: dict) -> tuple[str, float]:
    """The one number a paper reports for this metric."""
    if metric == "mme":
        return "perception", scores["perception"]
    if metric == "pope":
        return "overall F1", scores["overall"]["f1"]
    if metric == "anls":
        return "ANLS", scores["anls"]
    return "accuracy", scores["accuracy"]
