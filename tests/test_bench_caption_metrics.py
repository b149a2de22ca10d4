"""Caption metrics: pycocoevalcap's numbers, one METEOR JVM per run, SPICE never dropped silently."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import caption_metrics as cm
from bench.cli import main as bench_main
from dam.errors import DamInputError

pytest.importorskip("pycocoevalcap")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed")

PREDS = {
    "same": "A man is riding a brown horse on the beach.",
    "partial": "Two dogs play with a red ball in the park.",
    "other": "A plate of food with rice and vegetables.",
    "empty": "",
}
REFS = {
    "same": ["A man is riding a brown horse on the beach.", "Someone rides a horse near the sea."],
    "partial": ["A dog plays with a ball on the grass.", "Two puppies chase a red ball."],
    "other": ["A bowl of soup next to bread.", "Food on a white plate."],
    "empty": ["A cat sleeping on a sofa."],
}
MANY = 40  # items of the run whose Java processes are counted


def _dataset():
    preds, refs = dict(PREDS), {k: list(v) for k, v in REFS.items()}
    for n in range(MANY - len(preds)):
        preds[f"x{n}"] = f"a small {['red', 'blue', 'green'][n % 3]} car parked on street number {n}"
        refs[f"x{n}"] = [f"a {['red', 'white'][n % 2]} car on the street", "a vehicle parked by the road"]
    return preds, refs


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One real `dam-bench caption-metrics` run, counting the Java processes it starts."""
    root = tmp_path_factory.mktemp("captions")
    preds, refs = _dataset()
    (root / "preds.json").write_text(json.dumps(preds))
    (root / "refs.json").write_text(json.dumps(refs))
    java_cmds = []
    original = subprocess.Popen

    class CountingPopen(original):
        def __init__(self, args, *rest, **kwargs):
            if "java" in Path(str(args[0])).name:
                java_cmds.append([str(a) for a in args])
            super().__init__(args, *rest, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(subprocess, "Popen", CountingPopen)
    try:
        code = bench_main(["caption-metrics", "--pred", str(root / "preds.json"), "--refs", str(root / "refs.json"),
                           "--out", str(root / "result.json")])  # fmt: skip
    finally:
        mp.undo()
    return {"code": code, "result": json.loads((root / "result.json").read_text()), "java": java_cmds,
            "preds": preds, "refs": refs}  # fmt: skip


def _pycocoevalcap_direct(preds, refs):
    """The metrics as COCOEvalCap computes them: its tokenizer, then each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in refs[k]] for k in refs})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in refs})
    out = {}
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out[f"BLEU-{n + 1}"] = (bleu[n], bleu_items[n])
    for name, scorer in (("METEOR", Meteor()), ("ROUGE-L", Rouge()), ("CIDEr", Cider())):
        score, items = scorer.compute_score(gts, res)
        out[name] = (score, list(items))
    return out, list(refs)


@needs_java
def test_one_meteor_jvm_serves_the_whole_run(cli_run):
    assert cli_run["code"] == 0
    meteor = [c for c in cli_run["java"] if any("meteor" in a.lower() for a in c)]
    tokenizer = [c for c in cli_run["java"] if "edu.stanford.nlp.process.PTBTokenizer" in c]
    assert len(meteor) == 1, cli_run["java"]
    assert len(tokenizer) == 1  # predictions and references tokenized together
    assert len(cli_run["java"]) == 2  # for 40 items, not one per pair
    assert all(isinstance(v["scores"]["METEOR"], float) for v in cli_run["result"]["items"].values())


@needs_java
def test_identical_caption_scores_one(cli_run):
    scores = cli_run["result"]["items"]["same"]["scores"]
    for n in range(1, 5):
        assert scores[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    assert 0.9 < scores["METEOR"] <= 1.0
    assert cli_run["result"]["items"]["same"]["pred_tokenized"] == "a man is riding a brown horse on the beach"
    empty = cli_run["result"]["items"]["empty"]["scores"]
    assert empty["BLEU-1"] == 0.0 and empty["METEOR"] == 0.0 and empty["CIDEr"] == 0.0


@needs_java
def test_values_equal_pycocoevalcap_called_directly(cli_run):
    direct, ids = _pycocoevalcap_direct(cli_run["preds"], cli_run["refs"])
    result = cli_run["result"]
    for name in cm.METRICS:
        score, items = direct[name]
        assert result[name] == pytest.approx(float(score), rel=1e-9, abs=1e-12), name
        ours = [result["items"][i]["scores"][name] for i in ids]
        assert ours == pytest.approx([float(s) for s in items], rel=1e-9, abs=1e-12), name
    assert 0 < result["BLEU-1"] < 1 and 0 < result["METEOR"] <= 1
    partial = result["items"]["partial"]["scores"]
    assert 0 < partial["BLEU-1"] < 1 and 0 < partial["METEOR"] < 1


@needs_java
def test_spice_reported_unavailable_without_jars(cli_run, tmp_path, capsys, monkeypatch):
    assert cli_run["result"]["SPICE"] == cm.SPICE_UNAVAILABLE
    monkeypatch.setattr(cm, "score_captions", lambda preds, refs, spice_jars=None: cm.CaptionMetricsResult(
        {"BLEU-1": 0.5, "SPICE": cm.SPICE_UNAVAILABLE}, {}))  # fmt: skip
    (tmp_path / "p.json").write_text(json.dumps({"a": "x"}))
    (tmp_path / "r.json").write_text(json.dumps({"a": ["x"]}))
    assert bench_main(["caption-metrics", "--pred", str(tmp_path / "p.json"), "--refs", str(tmp_path / "r.json"),
                       "--out", str(tmp_path / "o.json")]) == 0  # fmt: skip
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith("SPICE: unavailable (pass --spice-jars with Stanford CoreNLP 3.6.0 jars)")


@needs_java
def test_tokenizer_keeps_one_line_per_caption():
    caps = {"a": ["First\u2028caption, here.", ""], "b": ["Line\nbreak\r\nand (parens)"], "c": ["Café crème!"]}
    assert cm.ptb_tokenize(caps) == {
        "a": ["first caption here", ""],
        "b": ["line break and -lrb- parens -rrb-"],  # as pycocoevalcap: lower-cased brackets are kept
        "c": ["café crème"],
    }


def test_input_formats(tmp_path):
    coco_refs = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]}
    assert cm.references_from_json(coco_refs, "r") == {"1": ["a", "b"]}
    assert cm.references_from_json({"7": "one"}, "r") == {"7": ["one"]}
    assert cm.predictions_from_json([{"image_id": 1, "caption": "x"}], "p") == {"1": "x"}
    assert cm.predictions_from_json({"1": "x"}, "p") == {"1": "x"}
    with pytest.raises(DamInputError, match="two captions for image_id 1"):
        cm.predictions_from_json([{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}], "p")
    with pytest.raises(DamInputError, match="non-empty list of caption strings"):
        cm.references_from_json({"1": []}, "r")
    with pytest.raises(DamInputError, match=r"1 of 2 reference ids have no predicted caption \(e\.g\. id '2'\)"):
        cm.check_inputs({"1": "x"}, {"1": ["x"], "2": ["y"]})


def test_spice_jars_folder_must_hold_corenlp(tmp_path, capsys):
    (tmp_path / "stanford-corenlp-3.6.0.jar").write_bytes(b"")
    with pytest.raises(DamInputError, match="lacks stanford-corenlp-3.6.0-models.jar"):
        cm.spice_classpath(tmp_path)
    (tmp_path / "p.json").write_text(json.dumps({"a": "x"}))
    (tmp_path / "r.json").write_text(json.dumps({"a": ["x"]}))
    argv = ["caption-metrics", "--pred", str(tmp_path / "p.json"), "--refs", str(tmp_path / "r.json"),
            "--out", str(tmp_path / "o.json"), "--spice-jars", str(tmp_path)]  # fmt: skip
    assert bench_main(argv) == 2
    assert "lacks stanford-corenlp-3.6.0-models.jar" in capsys.readouterr().err


@pytest.fixture
def spice_dir(tmp_path):
    jars = tmp_path / "jars"
    jars.mkdir()
    for name in (*cm.SPICE_JARS, "nashorn-core-15.4.jar"):
        (jars / name).write_bytes(b"")
    return jars


GTS = {"1": ["a man riding a horse"], "2": ["a dog on grass", "a puppy"]}
RES = {"1": ["a man on a horse"], "2": ["a cat"]}


def test_spice_runs_pycocoevalcap_jar_with_the_given_jars(spice_dir, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        data = json.loads(Path(cmd[cmd.index("edu.anu.spice.SpiceScorer") + 1]).read_text())
        seen["input"] = data
        out = Path(cmd[cmd.index("-out") + 1])
        out.write_text(json.dumps([{"image_id": "1", "scores": {"All": {"f": 0.5, "pr": 0.5, "re": 0.5}}},
                                   {"image_id": "2", "scores": {"All": {"f": "NaN"}}}]))  # fmt: skip
        return subprocess.CompletedProcess(cmd, 0, b"", b"")

    monkeypatch.setattr(cm.subprocess, "run", fake_run)
    mean, items = cm.run_spice(GTS, RES, spice_dir)
    classpath = seen["cmd"][seen["cmd"].index("-cp") + 1].split(":")
    assert Path(classpath[0]).name == "spice-1.0.jar"
    assert {str(spice_dir / name) for name in (*cm.SPICE_JARS, "nashorn-core-15.4.jar")} <= set(classpath)
    assert any(Path(p).name == "SceneGraphParser-1.0.jar" for p in classpath)  # pycocoevalcap's spice/lib
    assert seen["input"] == [{"image_id": "1", "test": "a man on a horse", "refs": ["a man riding a horse"]},
                             {"image_id": "2", "test": "a cat", "refs": ["a dog on grass", "a puppy"]}]  # fmt: skip
    assert items["1"] == 0.5 and items["2"] != items["2"]  # NaN, as pycocoevalcap's float_convert
    assert mean != mean  # a NaN item makes the mean NaN, as np.mean does in pycocoevalcap


def test_spice_without_json_output_falls_back_to_its_summary(spice_dir, monkeypatch, caplog):
    summary = "********  SPICE Evaluation  ********\n\nAll tuples\n  f-score:\t0.237 (SPICE metric)\n  precision:\t0.3\n"

    def fake_run(cmd, **kwargs):  # Java 15+: no Nashorn, the -out file stays empty, exit code 1
        Path(cmd[cmd.index("-out") + 1]).write_text("")
        return subprocess.CompletedProcess(cmd, 1, summary.encode(), b"java.lang.NullPointerException")

    monkeypatch.setattr(cm.subprocess, "run", fake_run)
    mean, items = cm.run_spice(GTS, RES, spice_dir)
    assert mean == pytest.approx(0.237) and items is None
    assert "Nashorn" in caplog.text

    monkeypatch.setattr(cm.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, b"", b"boom"))
    with pytest.raises(DamInputError, match="SPICE failed .*boom"):
        cm.run_spice(GTS, RES, spice_dir)
