"""The experiment commands' text and arguments, without a server."""

from __future__ import annotations

from ntrain.v1 import training_pb2 as pb

from ntrain.client import experiment_spec
from service.cli.experiment_commands import describe_experiment, experiments_table
from service.cli.parser import build_parser


def experiment() -> pb.Experiment:
    trials = [
        pb.Trial(number=0, params={"learning_rate": "0.001", "optimizer": "adam"}, job_id="job-a",
                 state=pb.TRIAL_STATE_SUCCEEDED, epochs=9, metric=0.975),
        pb.Trial(number=1, params={"learning_rate": "0.1", "optimizer": "sgd"}, job_id="job-b",
                 state=pb.TRIAL_STATE_STOPPED_EARLY, epochs=1, metric=0.91, stopped_early_at=1),
        pb.Trial(number=2, params={"learning_rate": "0.003", "optimizer": "adam"}, job_id="job-c",
                 state=pb.TRIAL_STATE_SUCCEEDED, epochs=9, metric=0.981),
        pb.Trial(number=3, params={"learning_rate": "0.01", "optimizer": "adam"},
                 state=pb.TRIAL_STATE_PENDING),
    ]  # fmt: skip
    return pb.Experiment(
        experiment_id="exp-0123456789ab",
        spec=pb.ExperimentSpec(
            base=pb.JobSpec(dataset="mnist", epochs=9),
            parameters=[
                pb.SearchParameter(
                    name="learning_rate", float_range=pb.FloatRange(low=1e-4, high=1)
                ),
                pb.SearchParameter(
                    name="optimizer", categorical=pb.CategoricalValues(values=["adam"])
                ),
            ],
            metric="eval_accuracy",
            direction="maximize",
            searcher="random",
            early_stopping=pb.EarlyStopping(
                kind="successive_halving", min_epochs=1, reduction_factor=3
            ),
            max_trials=4,
        ),
        state=pb.EXPERIMENT_STATE_RUNNING,
        trials=trials,
        best_trial=2,
    )


def test_describe_sorts_the_trials_by_the_metric_best_first():
    text = describe_experiment(experiment())
    rows = text.split("TRIAL", 1)[1].splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["2", "0", "1", "3"]
    assert "best        trial 2 (job job-c): eval_accuracy 98.10%" in text
    assert "at epoch 1" in rows[2] and "STOPPED_EARLY" in rows[2]
    assert rows[3].split()[1:5] == ["0.01", "adam", "0", "PENDING"]


def test_the_experiments_table_shows_the_best_trial():
    table = experiments_table([experiment()])
    assert "exp-0123456789ab" in table and "98.10% (trial 2)" in table
    assert "random+sha" in table and "4/4" in table


def test_sweep_and_the_experiment_forms_of_describe_model_cancel_parse():
    parser = build_parser()
    args = parser.parse_args(["sweep", "-f", "sweep.yaml", "--detach"])
    assert args.file == "sweep.yaml" and args.detach
    for command in (["describe", "exp-0123456789ab"], ["cancel", "exp-0123456789ab"],
                    ["model", "exp-0123456789ab", "-o", "out"]):  # fmt: skip
        assert parser.parse_args(command).job_id == "exp-0123456789ab"


def test_a_sweep_file_reads_in_the_json_mapping(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "base: {dataset: mnist, epochs: 9}\n"
        "parameters:\n"
        "  - {name: learning_rate, floatRange: {low: 0.0001, high: 0.1, log: true}}\n"
        "  - {name: optimizer, categorical: {values: [adam, sgd]}}\n"
        "earlyStopping: {kind: successive_halving, minEpochs: 1, reductionFactor: 3}\n"
        "maxTrials: 16\n"
    )
    spec = experiment_spec(path)
    assert spec.parameters[0].float_range.log and spec.max_trials == 16
    assert spec.early_stopping.reduction_factor == 3
