"""The Grafana dashboard of ntrain, built with Grafana's foundation SDK.

    python deploy/grafana/dashboard.py          (make dashboard) writes dashboards/ntrain.json
    python deploy/grafana/dashboard.py --check  exits 1 when the committed file differs

The SDK's types are Grafana's own dashboard schema (the `grafana-foundation-sdk`
release built for the Grafana of deploy/docker-compose.yml), so a field Grafana
does not know is a type error here rather than a panel that silently shows
nothing. tests/test_deploy.py checks the committed JSON equals a fresh
generation, and tests/test_prometheus_e2e.py runs every query against a real
Prometheus scraping a server that trained a job.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import (
    ReduceDataOptions,
    VizLegendOptions,
    VizTooltipOptions,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    BigValueJustifyMode,
    BigValueTextMode,
    GraphDrawStyle,
    LegendDisplayMode,
    LegendPlacement,
    SortOrder,
    TooltipDisplayMode,
    VisibilityMode,
)
from grafana_foundation_sdk.models.dashboard import Dashboard as DashboardModel
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

OUTPUT = Path(__file__).parent / "dashboards" / "ntrain.json"
# Every query goes to the Prometheus the `datasource` variable picks.
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'job_id=~"$job_id"'  # the `job_id` variable: one job, several, or all
SCRAPED = 'job="ntrain"'  # series every exporter has (gRPC, process): only the server's


def query(ref_id: str, expr: str, legend: str) -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .datasource(PROMETHEUS)
        .ref_id(ref_id)
        .expr(expr)
        .legend_format(legend)
        .range()
    )


def graph(
    title: str,
    description: str,
    *queries: tuple[str, str],
    unit: str = "short",
    width: int = 8,
) -> timeseries.Panel:
    """A time series panel of `queries`, each (PromQL, legend), as lines."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(PROMETHEUS)
        .span(width)
        .height(8)
        .unit(unit)
        .draw_style(GraphDrawStyle.LINE)
        .line_width(1)
        .fill_opacity(10)
        .show_points(VisibilityMode.NEVER)
        .span_nulls(True)
        .legend(
            VizLegendOptions()
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.NONE))
    )
    for ref_id, (expr, legend) in zip("ABCDEFGH", queries, strict=False):
        panel.with_target(query(ref_id, expr, legend))
    return panel


def single_stat(title: str, description: str, expr: str, legend: str) -> stat.Panel:
    """A stat panel of one instant query's last value."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(PROMETHEUS)
        .span(4)
        .height(8)
        .unit("short")
        .with_target(query("A", expr, legend).instant())
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(BigValueColorMode.VALUE)
        .graph_mode(BigValueGraphMode.NONE)
        .text_mode(BigValueTextMode.AUTO)
        .justify_mode(BigValueJustifyMode.AUTO)
    )


def quantiles(
    metric: str, by: str, legend: str, *levels: float, selector: str = ""
) -> list[tuple[str, str]]:
    """histogram_quantile of `metric`'s buckets summed by `by`, one query per level."""
    grouping = f"{by}, le" if by else "le"
    matchers = f"{{{selector}}}" if selector else ""
    buckets = f"rate({metric}_bucket{matchers}[$__rate_interval])"
    return [
        (
            f"histogram_quantile({level}, sum by ({grouping}) ({buckets}))",
            f"{legend} p{round(level * 100)}".strip(),
        )
        for level in levels
    ]


def training_row() -> list[timeseries.Panel]:
    return [
        graph(
            "Loss",
            "Training loss: mean over the epoch so far. Test loss: at the end of each epoch.",
            (f"ntrain_train_loss{{{JOB}}}", "{{job_id}} train"),
            (f"ntrain_eval_loss{{{JOB}}}", "{{job_id}} test"),
            width=12,
        ),
        graph(
            "Accuracy",
            "Training accuracy over the epoch so far; test accuracy at the end of each epoch.",
            (f"ntrain_train_accuracy_ratio{{{JOB}}}", "{{job_id}} train"),
            (f"ntrain_eval_accuracy_ratio{{{JOB}}}", "{{job_id}} test"),
            unit="percentunit",
            width=12,
        )
        .min(0)
        .max(1),
        graph(
            "Examples per second",
            "The job's steady-state throughput as the worker reports it, and the rate of its "
            "example counter.",
            (f"ntrain_train_examples_per_second{{{JOB}}}", "{{job_id}} ({{strategy}})"),
            (
                f"sum by (job_id) (rate(ntrain_train_examples_total{{{JOB}}}[$__rate_interval]))",
                "{{job_id}} measured by Prometheus",
            ),
            width=12,
        ),
        graph(
            "Step duration quantiles",
            "Mean step time of each compiled call (steps_per_execution steps), as quantiles.",
            *quantiles(
                "ntrain_train_step_duration_seconds",
                "job_id",
                "{{job_id}}",
                0.5,
                0.9,
                0.99,
                selector=JOB,
            ),
            unit="s",
            width=12,
        ),
        graph(
            "Batches per second",
            "Training steps per second; flat at zero means the job has stalled.",
            (
                "sum by (job_id, strategy) "
                f"(rate(ntrain_train_batches_total{{{JOB}}}[$__rate_interval]))",
                "{{job_id}} ({{strategy}})",
            ),
        ),
        graph(
            "Epoch",
            "The epoch each job is training (1-based).",
            (f"ntrain_train_epoch{{{JOB}}}", "{{job_id}}"),
        ).decimals(0),
        graph(
            "Checkpoint save time",
            "Mean time to write a checkpoint.",
            (
                "sum by (job_id) "
                f"(rate(ntrain_checkpoint_save_duration_seconds_sum{{{JOB}}}[$__rate_interval]))"
                " / sum by (job_id) "
                f"(rate(ntrain_checkpoint_save_duration_seconds_count{{{JOB}}}[$__rate_interval]))",
                "{{job_id}}",
            ),
            unit="s",
        ),
        graph(
            "GPU memory: in use and epoch peak",
            "Memory TensorFlow's allocator gave a job's tensors on each GPU: at the end of the "
            "last epoch, and the most at once during it (evaluation included). Not the CUDA "
            "context. Empty on hosts without GPUs.",
            (f"ntrain_gpu_memory_in_use_bytes{{{JOB}}}", "{{job_id}} {{device}} in use"),
            (f"ntrain_gpu_memory_peak_bytes{{{JOB}}}", "{{job_id}} {{device}} epoch peak"),
            unit="bytes",
            width=24,
        ),
    ]


def service_row() -> list[timeseries.Panel | stat.Panel]:
    return [
        graph(
            "Jobs by state",
            "Jobs in each state, including finished ones the server still remembers.",
            ("sum by (state) (ntrain_jobs)", "{{state}}"),
        ),
        graph(
            "Queue and warm workers",
            "Jobs waiting for a device, and worker processes ready with TensorFlow loaded.",
            ("sum(ntrain_queue_length)", "queued jobs"),
            ("sum(ntrain_warm_workers)", "warm workers"),
        ).decimals(0),
        graph(
            "Finished jobs by outcome",
            "Jobs that ended in each interval, by outcome.",
            (
                "sum by (outcome) (increase(ntrain_jobs_finished_total[$__rate_interval]))",
                "{{outcome}}",
            ),
        ).decimals(0),
        graph(
            "Submit to first step",
            "From SubmitJob to the job's first progress: queueing, worker start, tracing.",
            *quantiles("ntrain_submit_to_first_step_seconds", "", "", 0.5, 0.9),
            unit="s",
            width=6,
        ),
        graph(
            "Job duration",
            "Run time of the jobs that ended in each interval.",
            *quantiles("ntrain_job_duration_seconds", "", "", 0.5, 0.9),
            unit="s",
            width=6,
        ),
        graph(
            "MLflow: failed logs",
            "Calls to the MLflow tracking server that failed or were dropped (the job's log "
            "says which); zero when the server tracks no runs.",
            (
                "sum(increase(ntrain_mlflow_log_failures_total[$__rate_interval]))",
                "failed logs",
            ),
            width=4,
        ).decimals(0),
        single_stat(
            "Devices",
            "Devices the server found at start-up.",
            "sum by (type) (ntrain_devices)",
            "{{type}}",
        ).decimals(0),
        single_stat(
            "Version",
            "ntrain_build_info: the versions the server runs.",
            "max by (version, tensorflow_version) (ntrain_build_info)",
            "ntrain {{version}}, TF {{tensorflow_version}}",
        ),
    ]


def scheduling_row() -> list[timeseries.Panel]:
    return [
        graph(
            "Preemptions",
            "Jobs stopped at a step boundary for a job of higher priority, per interval; each "
            "resumes where it stood. An alert fires for one preempted 3 times in an hour.",
            (
                f"sum by (job_id) (increase(ntrain_job_preemptions_total{{{JOB}}}"
                "[$__rate_interval])) or vector(0)",
                "{{job_id}}",
            ),
            width=12,
        ).decimals(0),
        graph(
            "Experiments: trials by state",
            "The trials of every running experiment (hyperparameter searches), by state; "
            "stopped_early are those successive halving ended.",
            ("sum by (state) (ntrain_experiment_trials)", "{{state}}"),
            width=6,
        ).decimals(0),
        graph(
            "Experiments: best metric",
            "The best value of each experiment's metric so far.",
            ("max by (experiment_id, metric) (ntrain_experiment_best_metric)", "{{experiment_id}}"),
            width=6,
        ),
    ]


def grpc_row() -> list[timeseries.Panel]:
    handled = f"grpc_server_handled_total{{{SCRAPED}"
    return [
        graph(
            "Requests per second",
            "RPCs completed, by method.",
            (
                f"sum by (grpc_service, grpc_method) (rate({handled}}}[$__rate_interval]))",
                "{{grpc_service}}/{{grpc_method}}",
            ),
            unit="reqps",
        ),
        graph(
            "Errors per second",
            "RPCs that ended with a status other than OK, by method and code.",
            (
                "sum by (grpc_service, grpc_method, grpc_code) "
                f'(rate({handled}, grpc_code!="OK"}}[$__rate_interval]))',
                "{{grpc_service}}/{{grpc_method}} {{grpc_code}}",
            ),
            unit="reqps",
        ),
        graph(
            "Latency (unary calls)",
            'Handling time of unary calls (grpc_type="unary"); streams (WatchJob, health Watch, '
            "reflection) last as long as the client follows them.",
            *quantiles(
                "grpc_server_handling_seconds",
                "grpc_service, grpc_method",
                "{{grpc_service}}/{{grpc_method}}",
                0.5,
                0.99,
                selector=f'{SCRAPED}, grpc_type="unary"',
            ),
            unit="s",
        ),
    ]


def process_row() -> list[timeseries.Panel]:
    return [
        graph(
            "CPU",
            "CPU time of the ntrain serve process, in cores (its job workers are other processes, "
            "not counted here).",
            (f"rate(process_cpu_seconds_total{{{SCRAPED}}}[$__rate_interval])", "{{instance}}"),
        ),
        graph(
            "Memory",
            "Resident and virtual memory of the ntrain serve process (not its workers).",
            (f"process_resident_memory_bytes{{{SCRAPED}}}", "{{instance}} resident"),
            (f"process_virtual_memory_bytes{{{SCRAPED}}}", "{{instance}} virtual"),
            unit="bytes",
        ),
        graph(
            "Open files and Python GC",
            "File descriptors the server holds (sockets, the job database, worker pipes) against "
            "its limit, and Python's garbage collections per second.",
            (f"process_open_fds{{{SCRAPED}}}", "{{instance}} open fds"),
            (f"process_max_fds{{{SCRAPED}}}", "{{instance}} fd limit"),
            (
                "sum by (instance) "
                f"(rate(python_gc_collections_total{{{SCRAPED}}}[$__rate_interval]))",
                "{{instance}} GC collections/s",
            ),
        ),
    ]


ROWS = (
    ("Training (per job)", training_row),
    ("Service", service_row),
    ("Scheduling and experiments", scheduling_row),
    ("gRPC", grpc_row),
    ("Server process", process_row),
)


def build() -> DashboardModel:
    job_ids = "label_values(ntrain_train_batches_total, job_id)"
    board = (
        dashboard.Dashboard("ntrain training")
        .uid("ntrain")
        .description(
            "Training jobs, the job service and its gRPC API (deploy/grafana/dashboard.py)."
        )
        .tags(["ntrain"])
        .timezone("browser")
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("10s")
        .time("now-1h", "now")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            dashboard.QueryVariable("job_id")
            .label("Job")
            .datasource(PROMETHEUS)
            .query({"query": job_ids, "refId": "job_id"})
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .include_all(True)
            .multi(True)
            .all_value(".*")
            .current(VariableOption(selected=True, text=["All"], value=["$__all"]))
            .sort(VariableSort.ALPHABETICAL_ASC)
        )
    )
    board.annotations([])
    ids = iter(range(1, 1000))
    for title, panels in ROWS:
        board.with_row(dashboard.Row(title).id(next(ids)))
        for panel in panels():
            board.with_panel(panel.id(next(ids)))
    return board.build()


def render() -> str:
    """The dashboard's JSON, as committed."""
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} differs from a fresh generation: run make dashboard", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
