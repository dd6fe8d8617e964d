"""What a sweep tells people where they look: the parent run's description, the registered
model's and each version's, and the lines printed when the sweep ends.

MLflow shows a run's `mlflow.note.content` tag as its Markdown description, and a model's or
version's `description` on its page. Pure builders: the callers write them.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from search.tracking import tags as tag_keys
from search.tracking.mlflow_runs import DEFAULT_STORE, ML_VIEW, public_uri, redact_uri

# Links inside MLflow (descriptions) are relative to the page: `#/experiments/1/runs/abc`
# opens on whatever host, port and path prefix serves the UI (its index.html sets no <base>,
# and its Markdown sanitiser keeps relative hrefs). Printed lines are absolute only where the
# server's URL is known (a tracking server, or the one `python search/ui.py` starts).

# The parent run's interactive all-trials figure, at the top of its artifacts.
ALL_TRIALS_FIGURE = "val_loss_all_trials.html"
UI_SCRIPT = "search/ui.py"
# Where `python search/ui.py` serves by default (MLflow's own default port, loopback only).
LOCAL_HOST, LOCAL_PORT = "127.0.0.1", 5000
LOCAL_UI = f"http://{LOCAL_HOST}:{LOCAL_PORT}"


def headline(metrics: dict[str, float]) -> str:
    """`acc 0.91  ROC AUC 0.97  sensitivity 0.93  specificity 0.88` (macro_* for K classes)."""
    parts = [("acc", "accuracy"), ("ROC AUC", "roc_auc")]
    if "sensitivity" in metrics:
        parts += [("sensitivity", "sensitivity"), ("specificity", "specificity")]
    else:
        parts += [("macro recall", "macro_recall"), ("macro specificity", "macro_specificity")]
    return "  ".join(f"{label} {metrics[key]:.4f}" for label, key in parts if key in metrics)


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def store_word(tracking_uri: str) -> str:
    """The store as a shell word for a printed command. A URL holding a password is
    `"$MLFLOW_TRACKING_URI"`: the line is printed and logged, so the password stays in the
    environment, and the command still runs as copied (a masked `***` URL would not)."""
    if redact_uri(tracking_uri) != tracking_uri:
        return '"$MLFLOW_TRACKING_URI"'
    return shlex.quote(tracking_uri)


def is_default_store(tracking_uri: str) -> bool:
    """Whether a command without --tracking-uri reaches this store (the repo's SQLite)."""
    return not tracking_uri or tracking_uri == f"sqlite:///{DEFAULT_STORE / 'mlflow.db'}"


def ui_command(tracking_uri: str) -> str | None:
    """The command that serves a local store's UI and prints its addresses (None: a server
    already serves it)."""
    if is_server(tracking_uri):
        return None
    words = ["python", UI_SCRIPT]
    if not is_default_store(tracking_uri):
        words += ["--tracking-uri", store_word(tracking_uri)]
    return " ".join(words)


def experiment_route(experiment_id: str) -> str:
    """The experiment's training runs, relative to any MLflow UI page."""
    return f"#/experiments/{experiment_id}/runs?{ML_VIEW}"


def run_route(experiment_id: str, run_id: str) -> str:
    """A run's page, relative to any MLflow UI page."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{ML_VIEW}"


def artifact_route(experiment_id: str, run_id: str, path: str) -> str:
    """A run's artifact shown in its artifact view (HTML rendered, scripts run)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}/artifactPath/{path}?{ML_VIEW}"


def model_route(model_name: str, version: Any) -> str:
    """A registered version's page, relative to any MLflow UI page (in the model-training
    view: without it MLflow 3 shows the registry under its GenAI navigation)."""
    return f"#/models/{quote(str(model_name), safe='')}/versions/{version}?{ML_VIEW}"


def address(ui_base: str | None, route: str) -> str | None:
    """`route` on a UI served at `ui_base` (None: no server URL known)."""
    return f"{ui_base.rstrip('/')}/{route}" if ui_base else None


def server_base(tracking_uri: str) -> str | None:
    """The UI's URL when the store is a tracking server (without its login), else None."""
    return public_uri(tracking_uri) if is_server(tracking_uri) else None


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A run's absolute address for pages outside MLflow (optuna-dashboard's notes): on the
    server, or where `python search/ui.py` serves a local store by default."""
    return address(server_base(tracking_uri) or LOCAL_UI, run_route(experiment_id, run_id))


def pull_command(model_name: str, tracking_uri: str, alias: str = "champion") -> str:
    """The exact `search/pull.py` line for this store (the password stays in the env)."""
    parts = ["python", "search/pull.py", "--name", model_name]
    if alias != "champion":
        parts += ["--alias", alias]
    words = [shlex.quote(p) for p in parts]
    if is_server(tracking_uri):
        words += ["--tracking-uri", shlex.quote(public_uri(tracking_uri))]
    elif not is_default_store(tracking_uri):
        words += ["--tracking-uri", store_word(tracking_uri)]  # no password in descriptions
    return " ".join(words)


def short_number(value: Any) -> str:
    """A figure as people read it (4 significant digits: 0.7018); anything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_fmt = short_number


def parent_description(study: str, summary: dict[str, Any], objective: str,
                       best_run: tuple[str, str] | None, decision: dict[str, Any] | None,
                       tracking_uri: str, model_name: str, stopped: str | None = None,
                       experiment_id: str | None = None, parent_run_id: str | None = None,
                       ) -> str:
    """The sweep's parent-run description (Markdown), led by what matters: MLflow's run page
    folds a description after about 100 px (three lines), so those lines hold how the sweep
    ended, the registry's decision with the champion's commands, and the best trial with every
    trial's curves; the counts and the parameters follow. Links are relative (any host/port).

    Args:
        best_run: (experiment id, run id) of the best trial's run, when it has one.
        decision: the registry decision (`PromotionDecision.to_dict()`), when one was made.
        stopped: how the sweep's end stopped before its last step, in words (None: it ran).
        experiment_id, parent_run_id: the parent run, for the link to its all-trials figure.
    """
    top = [f"**Stopped:** {stopped}; the steps after it did not run."] if stopped else []
    top += registry_lines(decision, tracking_uri, model_name)
    top.append(best_line(summary, objective, best_run, experiment_id, parent_run_id))
    counts = ", ".join(f"{n} {s.lower()}" for s, n in summary.get("counts", {}).items())
    lines = [f"- {line}" for line in top]
    lines += ["", f"Sweep of study `{study}`: {counts or 'no trials'}."]
    best = summary.get("best")
    if best and best.get("params"):
        lines += ["", f"Parameters of trial {best['number']}:"]
        lines += [f"- `{k}` = {_fmt(v)}" for k, v in best["params"].items()]
    return "\n".join(lines)


def registry_lines(decision: dict[str, Any] | None, tracking_uri: str,
                   model_name: str) -> list[str]:
    """The registry's decision, then what to pull and predict with (or why nothing)."""
    if not decision:
        return ["**Registry:** nothing promoted by this sweep."]
    held_out = decision.get("new_metrics", {}).get(decision["metric"])
    champion = _champion_after(decision)
    stays = ("" if decision["promoted"] or champion is None
             or champion == decision["version"] else f"; the champion stays v{champion}")
    lines = [f"**Registry:** `{decision['model_name']}` v{decision['version']} → "
             f"{_alias_words(decision)} ({_verdict(decision)}: {decision['reason']}); held-out "
             f"{decision['metric']} = {_fmt(held_out)}"
             f"{_interval(decision.get('new_intervals'), decision['metric'])}{stays}."]
    if champion is None:
        return lines + [f"No version of `{model_name}` holds @champion: nothing to pull or "
                        "serve until one passes the floor."]
    predict = f"python search/predict.py models:/{model_name}@champion <images>"
    return lines + [f"Pull: `{pull_command(model_name, tracking_uri)}` · predict: `{predict}`"]


def best_line(summary: dict[str, Any], objective: str, best_run: tuple[str, str] | None,
              experiment_id: str | None, parent_run_id: str | None) -> str:
    """The best trial (linked to its run) and every trial's curves (linked to the figure)."""
    curves = (f" · [every trial's val_loss]"
              f"({artifact_route(experiment_id, parent_run_id, ALL_TRIALS_FIGURE)})"
              if experiment_id and parent_run_id else "")
    best = summary.get("best")
    if best:
        trial = f"trial {best['number']}"
        if best_run:
            trial = f"[{trial}]({run_route(*best_run)})"
        return f"**Best:** {trial}, {objective} = {_fmt(best['value'])}{curves}"
    if summary.get("pareto_front"):
        return (f"**Pareto front:** {len(summary['pareto_front'])} trial(s); see "
                f"`sweep/summary.json`{curves}")
    return f"**No trial completed.**{curves}"


def _alias_words(decision: dict[str, Any]) -> str:
    """`@champion`, `@challenger`, or `no alias` for a version refused by the floor."""
    if decision.get("below_floor") and decision.get("alias") not in ("champion", "challenger"):
        return "no alias"
    return f"@{decision['alias']}"


def _verdict(decision: dict[str, Any]) -> str:
    """`promoted`, `not promoted`, or the floor's refusal with its figure."""
    if decision.get("below_floor"):
        return "refused by the quality floor"
    return "promoted" if decision["promoted"] else "not promoted"


def _champion_after(decision: dict[str, Any]) -> Any:
    """The version holding @champion after this decision (None: no champion)."""
    # under the floor, a version that held @champion before keeps it (champion.py)
    if decision["promoted"] or (decision.get("below_floor") and decision["alias"] == "champion"):
        return decision["version"]
    return decision.get("champion_version")


def _interval(intervals: dict[str, Any] | None, key: str) -> str:
    low, high = ((intervals or {}).get(key) or [None, None])[:2]
    return "" if low is None or high is None else f" [{_fmt(low)}, {_fmt(high)}]"


def operating_point(metrics: dict[str, float], intervals: dict[str, Any] | None = None) -> str:
    """`sensitivity 0.97 [0.94, 0.99], specificity ...` (95 % intervals where known)."""
    keys = [("sensitivity", "sensitivity"), ("specificity", "specificity"),
            ("macro_recall", "macro recall"), ("macro_specificity", "macro specificity"),
            ("accuracy", "accuracy"), ("roc_auc", "ROC AUC")]
    found = [f"{label} {_fmt(metrics[k])}{_interval(intervals, k)}" for k, label in keys
             if k in metrics]
    return ", ".join(found) or "n/a"


def version_description(run: Any, metadata: dict[str, Any],
                        decision: dict[str, Any] | None = None) -> str:
    """A model version's description: what it was trained on, what it won on, where it
    operates, and where its full config is (the run's `config/config.yaml` artifact)."""
    tags, params = run.data.tags, run.data.params
    trial = tags.get(tag_keys.OPTUNA_TRIAL_NUMBER)
    origin = (f"trial {trial} of study `{tags.get(tag_keys.OPTUNA_STUDY)}`" if trial is not None
              else "a single run")
    data = params.get("data", "?")
    lines = [
        f"Keras model from run `{run.info.run_id}` ({origin}).",
        "- " + task_line(list(metadata.get("class_names") or []), metadata.get("threshold"),
                         metadata.get("threshold_rule")),
        f"- **Trained on:** `{data}` ({params.get('data.n_train', '?')} train / "
        f"{params.get('data.n_val', '?')} val images, fingerprint "
        f"`{str(metadata.get('data_fingerprint'))[:12]}`); config hash "
        f"`{metadata.get('config_hash')}`.",
        (f"- **Threshold:** {_fmt(metadata.get('threshold'))} "
         f"({metadata.get('threshold_rule')}, chosen on val)."
         if metadata.get("threshold") is not None else
         "- **Decision:** the most probable class (argmax; no threshold)."),
    ]
    if decision:
        metrics = decision.get("new_metrics", {})
        promotion = (f"refused by the quality floor, {_alias_words(decision)} (not for "
                     "serving):" if decision.get("below_floor") else f"@{decision['alias']} on")
        lines += [
            f"- **Promotion:** {promotion} held-out {decision['metric']} = "
            f"{_fmt(metrics.get(decision['metric']))} ({decision['reason']}).",
            f"- **Operating point (held-out, at the threshold):** "
            f"{operating_point(metrics, decision.get('new_intervals'))}.",
        ]
        for name, ext in (decision.get("new_external") or {}).items():
            lines.append(f"- **External set {name}** ({ext.get('n')} images, never used for "
                         f"selection): {operating_point(ext['metrics'], ext.get('intervals'))}.")
    lines += contract_lines(metadata)
    lines.append(f"- **Config:** `runs:/{run.info.run_id}/config/config.yaml`.")
    return "\n".join(lines)


def contract_lines(metadata: dict[str, Any]) -> list[str]:
    """The served input and output (search/tracking/serving.py), for a description."""
    prep = metadata.get("preprocessing") or {}
    size, channels = prep.get("image_size", "?"), prep.get("channels", "?")
    names = list(metadata.get("class_names") or [])
    columns = ", ".join(f"`p_{n}`" for n in names)
    return [
        f"- **Input (serving):** raw 0–255 pixels, float32 `(N, {size}, {size}, {channels})` "
        "(JSON numbers over REST); `params={\"scaled\": true}` for pixels already scaled "
        "to 0–1. Other sizes: `search/predict.py`, which decodes and resizes files.",
        f"- **Output:** {columns} (probabilities, classes in output order), `predicted_label` "
        "(at the threshold) and `threshold`.",
    ]


def serve_command(model_name: str) -> str:
    return (f"mlflow models serve -m models:/{model_name}@champion --env-manager local "
            "--host 127.0.0.1 --port 5001")


def model_description(model_name: str, decision: dict[str, Any], tracking_uri: str) -> str:
    """The registered model's description: who is champion now and how to pull it."""
    champion = _champion_after(decision)
    metric = decision["metric"]
    lines = [f"Image classifier promoted by the sweeps' champion/challenger gate on "
             f"held-out {metric} (tie-break {decision['tie_break']}).", ""]
    if champion is None:  # the only version(s) so far missed the quality floor
        return "\n".join(lines + [
            f"**No champion:** v{decision['version']} was refused by the quality floor "
            f"({decision['reason']}). Nothing to serve until a version passes the floor.",
            "", "Each version's description gives its input and output contract."])
    lines.append(f"**Champion:** v{champion} (`models:/{model_name}@champion`).")
    lines += ["", "```", pull_command(model_name, tracking_uri),
              f"python search/predict.py models:/{model_name}@champion <images> --out "
              "predictions",
              serve_command(model_name) + "   # PATH must hold the venv's bin (uvicorn)",
              "```", "", "Each version's description gives its input and output contract."]
    return "\n".join(lines)


def next_steps(tracking_uri: str, experiment_id: str, parent_run_id: str,
               model_name: str, decision: dict[str, Any] | None,
               stopped: str | None = None, artifact_uri: str | None = None) -> list[str]:
    """What to do after the sweep, printed at its end (`stopped`: how its end stopped).

    Addresses are printed only where the server is known (a tracking server); for a local
    store the UI command prints them on the server it starts, and `curves` is the figure's
    file (`artifact_uri`: the parent run's artifact location), which opens in a browser.
    """
    lines = ["Next:"]
    if stopped:
        lines.append(f"  stopped: {stopped}; the steps after it did not run")
    base = server_base(tracking_uri)
    command = ui_command(tracking_uri)
    if command:
        lines.append(f"  UI:      {command}   (MLflow's UI on this store; it prints the "
                     "addresses of this sweep, its curves and the champion)")
    lines.append(f"  curves:  {curves_target(base, experiment_id, parent_run_id, artifact_uri)}"
                 "  (every trial's val_loss, interactive)")
    sweep = address(base, run_route(experiment_id, parent_run_id))
    lines.append(f"  sweep:   {sweep or f'parent run {parent_run_id}, experiment {experiment_id}'}")
    if decision and decision.get("below_floor"):
        return lines + _refused_lines(tracking_uri, model_name, decision)
    if decision:
        state = "champion" if decision["promoted"] else "challenger (the champion stays)"
        lines += [f"  model:   models:/{model_name}/{decision['version']} is {state}; "
                  f"serve models:/{model_name}@champion",
                  f"  pull:    {pull_command(model_name, tracking_uri)}"]
    return lines


def curves_target(base: str | None, experiment_id: str, parent_run_id: str,
                  artifact_uri: str | None) -> str:
    """The all-trials figure in one click: its artifact view on a server, its file (a
    file:// URI a terminal opens) for a local store, else where to find it."""
    if base:
        return address(base, artifact_route(experiment_id, parent_run_id, ALL_TRIALS_FIGURE))
    if artifact_uri and urlsplit(artifact_uri).scheme in ("", "file"):
        folder = Path(unquote(urlsplit(artifact_uri).path))
        return (folder / ALL_TRIALS_FIGURE).as_uri()
    return f"{ALL_TRIALS_FIGURE} on the sweep's parent run"


def _refused_lines(tracking_uri: str, model_name: str, decision: dict[str, Any]) -> list[str]:
    """The closing lines for a version the quality floor refused: never "serve it"."""
    version = decision["version"]
    held_out = (decision.get("new_metrics") or {}).get(decision["metric"])
    lines = [f"  model:   models:/{model_name}/{version} is under the quality floor (held-out "
             f"{decision['metric']} {_fmt(held_out)} < registry.floor "
             f"{_fmt(decision.get('floor'))}): registered for inspection only, "
             f"{_alias_words(decision)}; do not serve it"]
    champion = _champion_after(decision)
    if champion is None:
        lines.append(f"  serve:   nothing: no version of {model_name} holds @champion")
    elif champion != version:
        lines.append(f"  serve:   models:/{model_name}@champion (v{champion}, unchanged)")
    inspect = pull_command(model_name, tracking_uri).split(" --name ")
    lines.append(f"  inspect: {inspect[0]} --version {version} --name {inspect[1]}")
    return lines


def task_line(class_names: list[str], threshold: float | None = None,
              rule: str | None = None) -> str:
    """What the model predicts and how a label is chosen."""
    names = ", ".join(f"`{n}`" for n in class_names)
    if len(class_names) == 2:
        cut = (f"P({class_names[-1]}) ≥ {_fmt(threshold)} ({rule}, chosen on val)"
               if threshold is not None else f"P({class_names[-1]}) ≥ the stored threshold")
        return f"**Task:** two classes ({names}, output order); the label is `{class_names[-1]}` " \
               f"when {cut}."
    return (f"**Task:** {len(class_names)} classes ({names}, output order); the label is the "
            "most probable class (argmax, no threshold). `macro_*` metrics are means over the "
            "classes, `roc_auc`/`pr_auc` are one-vs-rest and macro-averaged, and every class "
            "has `recall_<class>`, `precision_<class>` and `f1_<class>` (per epoch: `auc` and "
            "`recall_<class>`).")


def data_lines(source_info: dict[str, Any], input_shape: tuple[int, ...],
               fingerprint: str) -> list[str]:
    """Where the images came from and how many of each class each split holds."""
    where = source_info.get("root") or source_info.get("path") or "?"
    mode = source_info.get("label_mode")
    lines = [f"**Data:** {source_info.get('source', '?')} `{where}`"
             + (f" (label_mode {mode})" if mode else "")
             + f", input {'×'.join(map(str, input_shape))}, fingerprint `{fingerprint[:12]}`."]
    counts = source_info.get("counts") or {}
    if counts:
        classes = list(next(iter(counts.values())))
        lines += ["", "| split | " + " | ".join(classes) + " |",
                  "|---|" + "---|" * len(classes)]
        lines += [f"| {split} | " + " | ".join(str(c.get(k, 0)) for k in classes) + " |"
                  for split, c in counts.items()]
    return lines


def run_description(class_names: list[str], source_info: dict[str, Any],
                    input_shape: tuple[int, ...], fingerprint: str,
                    results: dict[str, float] | None = None, threshold_rule: str | None = None,
                    ) -> str:
    """A training run's description (Markdown): the task, its data and, once evaluated, the
    best checkpoint's val and test figures."""
    threshold = (results or {}).get("val_threshold")
    lines = [task_line(class_names, threshold, threshold_rule), "",
             *data_lines(source_info, input_shape, fingerprint)]
    if results:

        lines += ["", "**Best checkpoint** (95 % intervals on held-out images):"]
        splits = ["val", "test"] + sorted({k.split("_")[1] for k in results
                                           if k.startswith("ext_")})
        for split in splits:
            prefix = f"ext_{split}_" if split not in ("val", "test") else f"{split}_"
            metrics = {k.removeprefix(prefix): v for k, v in results.items()
                       if k.startswith(prefix) and "_ci_" not in k}
            intervals = {k.removeprefix(prefix).removesuffix("_ci_low"):
                         [v, results.get(k.removesuffix("_ci_low") + "_ci_high")]
                         for k, v in results.items() if k.startswith(prefix)
                         and k.endswith("_ci_low")}
            if metrics:
                label = split if prefix != f"ext_{split}_" else f"external {split}"
                loss = f"loss {_fmt(metrics['loss'])}  " if "loss" in metrics else ""
                lines.append(f"- {label}: {loss}" + (operating_point(metrics, intervals)
                                                     if intervals else headline(metrics)))
    return "\n".join(lines)
