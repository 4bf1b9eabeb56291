"""The figures: eval.py's SVG reward curves (one run, and runs overlaid over seeds), `eval.py --compare
--figure`, and the labelled gallery (data.render_poses row labels and column titles, train_rft.Gallery).
The SVG is read back with xml.etree, and each line's pixels are mapped back to values through the
panel's own tick labels: a figure whose ticks lie about its curves fails."""
import json
import math
import types
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as E
import train_rft

NS = {"s": "http://www.w3.org/2000/svg"}


def write_run(path, n=40, shift=0.0, nan_every=0, seed=0):
    """A metrics.jsonl of n steps: semantic/t2p rising, format/vqa NaN every nan_every steps (no VQA
    prompt in that step), format/i2p never sampled (NaN throughout), kl_c_exact and a key not drawn."""
    g = np.random.default_rng(seed)
    with open(path, "w") as f:
        for s in range(1, n + 1):
            vqa = float("nan") if nan_every and s % nan_every == 0 else 0.8 + 0.05 * g.standard_normal()
            f.write(json.dumps({"step": s, "reward/semantic/t2p": 0.2 + shift + 0.01 * s + 0.05 * g.standard_normal(),
                                "reward/format/vqa": vqa, "reward/format/i2p": float("nan"),
                                "kl_c_exact": 0.002 * s, "grad_norm": 1.0}) + "\n")
    return str(path)


def panels(svg):
    root = ET.fromstring(svg)
    return root, [g for g in root.iter("{%s}g" % NS["s"]) if g.get("class") == "panel"]


def ticks(panel, axis):
    """[(pixel, value)] of the panel's x or y ticks: the tick mark's position and its printed number."""
    marks = panel.findall(f"s:line[@class='{axis}tick']", NS)
    labels = panel.findall(f"s:text[@class='{axis}tick']", NS)
    assert len(marks) == len(labels) >= 2, f"{axis}: fewer than two ticks"
    return [(float(m.get("x1" if axis == "x" else "y1")), float(t.text)) for m, t in zip(marks, labels)]


def path_points(path, panel):
    """A path's vertices mapped back to (step, value) through the panel's tick labels."""
    (px0, x0), (px1, x1) = ticks(panel, "x")[:2]
    (py0, y0), (py1, y1) = ticks(panel, "y")[:2]
    pts = []
    for cmd in path.get("d").replace("Z", "").replace("M", " ").replace("L", " ").split():
        u, v = map(float, cmd.split(","))
        pts.append((x0 + (u - px0) * (x1 - x0) / (px1 - px0), y0 + (v - py0) * (y1 - y0) / (py1 - py0)))
    return pts


def assert_legend_outside(root, ps):
    """Every legend mark and text lies above every panel, its title included (a title's baseline is 14 px
    below its panel's top): outside the data areas, and not over the panel titles."""
    legend = next(g for g in root.iter("{%s}g" % NS["s"]) if g.get("class") == "legend")
    lowest = max(float(e.get("y", e.get("y2"))) + float(e.get("height", 0)) for e in legend)
    assert lowest < min(float(p.find("s:text[@class='title']", NS).get("y")) - 14 for p in ps)


def test_one_run_has_labelled_panels_whose_ticks_match_the_curves(tmp_path):
    """One panel per reward and task (a task never sampled gets none) plus kl_c_exact, each with an axis,
    numeric x and y ticks that bracket the data, a title naming reward and task, one faint per-step path
    and one running-mean path; mapped back through the tick labels the paths give the logged values and
    their running mean. Catches missing axes or ticks, tick labels that disagree with where the curve is
    drawn, a running mean over the wrong window, and a legend drawn over the data."""
    rows = E.read_metrics(write_run(tmp_path / "m.jsonl", n=40))
    root, ps = panels(E.reward_curves_svg(rows))
    titles = [p.find("s:text[@class='title']", NS).text for p in ps]
    assert titles == ["format reward, vqa", "semantic reward, t2p", "kl_c_exact"]
    for p, key in zip(ps, ["reward/format/vqa", "reward/semantic/t2p", "kl_c_exact"]):
        assert p.find("s:path[@class='axis']", NS) is not None
        assert p.find("s:text[@class='xlabel']", NS).text == "RFT step"
        vals = [r[key] for r in rows]
        xt, yt = [v for _, v in ticks(p, "x")], [v for _, v in ticks(p, "y")]
        assert xt[0] <= 1 and xt[-1] >= 40 and yt[0] <= min(vals) and yt[-1] >= max(vals)
        raw, mean = p.findall("s:path[@class='raw']", NS), p.findall("s:path[@class='mean']", NS)
        assert len(raw) == 1 and len(mean) == 1
        got = path_points(raw[0], p)
        np.testing.assert_allclose([x for x, _ in got], range(1, 41), atol=0.05)
        np.testing.assert_allclose([y for _, y in got], vals, atol=2e-3 * (yt[-1] - yt[0]))
        want = [np.mean(vals[max(0, j - 3):j + 1]) for j in range(40)]  # window: 10% of 40 steps
        np.testing.assert_allclose([y for _, y in path_points(mean[0], p)], want, atol=2e-3 * (yt[-1] - yt[0]))
    assert_legend_outside(root, ps)


def test_nan_steps_are_skipped_not_drawn_as_zero(tmp_path):
    """A step without a VQA prompt logs NaN for reward/format/vqa: the per-step path has no vertex there
    and no value near 0 is drawn (the rewards are near 0.8), and the running mean averages the finite
    values only. Catches NaN written into the path (an SVG that breaks) or counted as 0."""
    rows = E.read_metrics(write_run(tmp_path / "m.jsonl", n=30, nan_every=3))
    _, ps = panels(E.reward_curves_svg(rows))
    p = ps[0]
    assert p.find("s:text[@class='title']", NS).text == "format reward, vqa"
    assert "nan" not in ET.tostring(p, encoding="unicode").lower()
    raw = path_points(p.find("s:path[@class='raw']", NS), p)
    mean = path_points(p.find("s:path[@class='mean']", NS), p)
    finite = [s for s in range(1, 31) if s % 3]
    np.testing.assert_allclose([x for x, _ in raw], finite, atol=0.05)
    assert min(y for _, y in raw + mean) > 0.5
    steps, _, m = E.running_mean(rows, "reward/format/vqa", 3)
    assert steps == finite and m[1] == pytest.approx(np.mean([rows[0]["reward/format/vqa"],
                                                               rows[1]["reward/format/vqa"]]))


def test_comparison_overlays_one_line_per_label_with_the_seed_spread(tmp_path):
    """{label: [metrics.jsonl per seed]}: one panel per reward, in each exactly one mean line per label and
    one shaded band per label with several seeds (none for a single seed); the line is the mean over seeds
    of the running means and the band spans their min and max. Catches a line per seed instead of per
    label, a missing spread, a mean or band computed over the wrong runs, and a legend over the data."""
    hy = [write_run(tmp_path / f"h{s}.jsonl", shift=0.1 * s, seed=s) for s in range(3)]
    groups = {"hygrpo, all four rewards": hy,  # long labels: the legend wraps to a second row
              "grpo, discrete rewards only": [write_run(tmp_path / f"g{s}.jsonl", shift=-0.2, seed=10 + s)
                                              for s in range(2)],
              "one seed": [write_run(tmp_path / "o.jsonl", shift=0.5, seed=20)]}
    root, ps = panels(E.comparison_svg(groups))
    assert len(ps) == 3
    assert_legend_outside(root, ps)
    for p in ps:
        assert len(p.findall("s:path[@class='mean']", NS)) == 3
        assert len(p.findall("s:path[@class='spread']", NS)) == 2
        assert len(p.findall("s:path[@class='raw']", NS)) == 0
    p = ps[1]
    assert p.find("s:text[@class='title']", NS).text == "semantic reward, t2p"
    seeds = [E.running_mean(E.read_metrics(f), "reward/semantic/t2p", 4)[2] for f in hy]
    line = path_points(p.findall("s:path[@class='mean']", NS)[0], p)
    yt = [v for _, v in ticks(p, "y")]
    np.testing.assert_allclose([y for _, y in line], np.mean(seeds, 0), atol=2e-3 * (yt[-1] - yt[0]))
    band = [y for _, y in path_points(p.findall("s:path[@class='spread']", NS)[0], p)]
    np.testing.assert_allclose(band[:40], np.max(seeds, 0), atol=2e-3 * (yt[-1] - yt[0]))  # along hi,
    np.testing.assert_allclose(band[40:], np.min(seeds, 0)[::-1], atol=2e-3 * (yt[-1] - yt[0]))  # back along lo
    assert yt[0] <= min(band) and yt[-1] >= max(band)


def test_nice_ticks_are_round_and_bracket_the_range():
    """Catches ticks that leave data outside the labelled range, or an axis of zero length (a constant
    series) dividing by zero."""
    for lo, hi in [(0.31, 0.87), (1, 60), (-0.003, 0.0021), (5.0, 5.0), (0.0, 0.0), (-2.0, -1.9)]:
        t = E.nice_ticks(lo, hi)
        assert t[0] <= lo and t[-1] >= hi and t[-1] > t[0] and 2 <= len(t) <= 8
        gaps = np.diff(t)
        np.testing.assert_allclose(gaps, gaps[0])
        mant = gaps[0] / 10 ** math.floor(math.log10(gaps[0]))
        assert min(abs(mant - m) for m in (1, 2, 5, 10)) < 1e-9


def test_compare_command_writes_the_figure(tmp_path):
    """`python eval.py --compare A=r0,r1 B=r2 --figure=f.svg` prints the table and writes the overlay from
    each run's metrics.jsonl; the option may come anywhere; a missing metrics.jsonl or an empty --figure=
    is an error naming it. Catches --figure taken for a group of runs, or breaking plain --compare."""
    def run(name, gain):
        folder = tmp_path / name
        folder.mkdir()
        for file, v in (("eval_before.json", 60.0), ("eval_after.json", 60.0 + gain)):
            json.dump({"t2p_posecode_acc": v, "items": {"t2p_posecode_acc": [v, v]}}, open(folder / file, "w"))
        write_run(folder / "metrics.jsonl", n=12, seed=len(name))
        return str(folder)
    a, b = f"{run('a0', 2.0)},{run('a1', 3.0)}", run("b0", 1.0)
    fig = tmp_path / "fig4.svg"
    table = E.main(["--compare", f"--figure={fig}", f"hygrpo={a}", f"grpo={b}"])
    assert "| posecode" in table
    _, ps = panels(fig.read_text())
    assert len(ps) == 3 and all(len(p.findall("s:path[@class='mean']", NS)) == 2 for p in ps)
    assert "| posecode" in E.main(["--compare", f"hygrpo={a}"])  # no figure asked: as before
    with pytest.raises(SystemExit, match="usage"):
        E.main(["--compare", f"hygrpo={a}", "--figure="])
    (tmp_path / "b0" / "metrics.jsonl").unlink()
    with pytest.raises(SystemExit, match="b0/metrics.jsonl"):
        E.main(["--compare", f"hygrpo={a}", f"grpo={b}", f"--figure={fig}"])


def test_write_reward_curves_keeps_its_name_and_writes_atomically(tmp_path):
    """train_rft.write_reward_curves(metrics_path, svg_path), called during RFT, writes the panelled figure
    through a tmp file that is renamed (no .tmp left behind). Catches the old single canvas coming back."""
    svg = tmp_path / "reward_curves.svg"
    train_rft.write_reward_curves(write_run(tmp_path / "metrics.jsonl", n=5), str(svg))
    assert len(panels(svg.read_text())[1]) == 3 and not (tmp_path / "reward_curves.svg.tmp").exists()


def test_gallery_labels_rows_and_columns(tmp_path, monkeypatch):
    """train_rft.Gallery names each column in its cells ("GT", "step N") and writes each prompt's caption,
    shortened to the row's width, in a band above its row: the PNG grows by one band per row and the
    band holds light text pixels. The policy and data are stubbed (the figure is under test, not RFT).
    Catches unlabelled galleries, titles out of step with the columns, a wrong number of row labels
    accepted, and a long caption cut without a mark."""
    world = data.PoseWorld("val", size=30, seed=0, cache_dir=None)
    monkeypatch.setattr(train_rft.data, "PoseWorld", lambda *a, **k: world)
    monkeypatch.setattr(train_rft.data, "collate_fn", lambda *a: (lambda samples: {}))
    monkeypatch.setattr(train_rft.M, "sample_policy", lambda *a, **k: types.SimpleNamespace(mu=None))
    calls = []
    real = data.render_poses
    monkeypatch.setattr(train_rft.data, "render_poses", lambda *a, **k: calls.append(k) or real(*a, **k))
    cfg = types.SimpleNamespace(seed=0, image_size=32, out_dir=str(tmp_path), data="poseworld")
    gallery = train_rft.Gallery(cfg, None, None, None, "cpu", n=2)
    monkeypatch.setattr(train_rft.smpl, "pose_joints", lambda mu, body: torch.stack([s["joints"] for s in gallery.samples]))
    gallery.add(torch.nn.Linear(1, 1), 2)
    gallery.add(torch.nn.Linear(1, 1), 5)
    assert calls[-1]["titles"] == ["GT", "step 2", "step 5"] * 2
    assert calls[-1]["row_labels"] == [s["caption"] for s in gallery.samples]
    img = np.asarray(Image.open(tmp_path / "gallery.png"))
    size, band = 128, 9 * 2  # render_poses' default size; font scale 2 at 128 px
    assert img.shape == (2 * (size + band), 3 * 2 * size, 3)
    assert (img[:band] == 220).all(-1).sum() > 100  # the first caption is drawn
    assert (img[band:band + 14, :60] == 220).all(-1).sum() > 20  # "GT" in the first cell's corner
    with pytest.raises(ValueError, match="row_labels"):
        data.render_poses(torch.zeros(3, 24, 3), str(tmp_path / "x.png"), cols=3, row_labels=["a", "b"])
    assert data._fit("The person's left leg is straight.", 12) == "The person.."


def test_gallery_shows_legs_torso_and_arms_and_marks_each_code():
    """The gallery's PoseWorld rows are a kick, a lunge, a bow and a raised arm whose captions name a code
    of the family they show, and under each answer every code of its caption is marked met (+) or missed
    (-). Catches a gallery of arm-only captions, and marks that do not follow the pose."""
    import data
    import train_rft
    world = data.PoseWorld("val", seed=0, image_size=32)
    samples = train_rft.poseworld_gallery_samples(world, train_rft.Gallery.SHOWN)
    names = [data.ARCHETYPES[s["archetype"]].name for s in samples]
    assert names == ["kicking", "lunge", "bending", "arms_up"]
    for s, (_, family) in zip(samples, train_rft.Gallery.SHOWN):
        assert s["mentioned"][data.POSECODE_INDEX[family]]
        marks = train_rft.code_marks(s["joints"], s).split()
        assert len(marks) == int(s["mentioned"].sum()) and all(m.endswith("+") for m in marks)  # GT meets all
    kick = samples[0]
    standing = world[[int(i) for i in world.task_indices("t2p") if data.ARCHETYPES[world.archetype[i]].name
                      == "standing"][0]]["joints"]
    assert "RF-" in train_rft.code_marks(standing, kick).split()  # feet level: the raised foot is missed
