"""The TrainingService RPCs: convert the request, call the job manager, convert back.

No training logic and no error handling here: domain errors raised below are
mapped to status codes by `service.api.status_codes.ExceptionToStatusInterceptor`.
No metadata either: `service.api.auth.AuthInterceptor` authenticated the
caller before the handler runs, and the handler passes its principal on.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc

from service.api import convert, experiment_convert
from service.api.auth import principal_of
from service.api.streams import StreamSlots
from service.jobs import validation
from service.jobs.dataset_store import DatasetStore
from service.jobs.dataset_uploads import DatasetUploads
from service.jobs.datasets import check_dataset_name
from service.jobs.errors import InvalidArgument, Unavailable
from service.jobs.experiment_spec import check_experiment_id
from service.jobs.experiments import ExperimentManager
from service.jobs.manager import JobManager


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """Args:
    streams: the slots of WatchJob, GetJobLogs and DownloadModel streams (past
        a principal's share or the server's total, RESOURCE_EXHAUSTED), which
        also note how long each stream's client keeps a message waiting, and
        end a resumable stream at its age limit.

    uploads: receives UploadDataset's files into its store of data sets.
    experiments: runs SubmitExperiment and the other experiment RPCs (None:
        they are UNAVAILABLE).
    """

    def __init__(
        self,
        manager: JobManager,
        uploads: DatasetUploads,
        *,
        streams: StreamSlots,
        experiments: ExperimentManager | None = None,
    ):
        self.manager = manager
        self._experiments = experiments
        self.uploads = uploads
        self.datasets: DatasetStore = uploads.store
        self.streams = streams

    def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.ServicerContext) -> pb.Job:
        validation.check_request_id(request.request_id)
        with convert.fields_under("spec"):
            job_spec = convert.job_spec_from_proto(request.spec)
            record = self.manager.submit(
                job_spec, request.request_id, principal=principal_of(context)
            )
        return convert.job_to_proto(record)

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        validation.check_job_id(request.job_id)
        record = self.manager.get(request.job_id, principal=principal_of(context))
        return convert.job_to_proto(record, self.manager.model(request.job_id))

    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        page_size, cursor = validation.check_page(request.page_size, request.page_token)
        states = convert.states_from_proto(request.states)
        labels = convert.labels_from_proto(request.labels)
        records, next_cursor = self.manager.list(
            states=states,
            labels=labels,
            page_size=page_size,
            cursor=cursor,
            principal=principal_of(context),
        )
        return pb.ListJobsResponse(
            jobs=[convert.job_to_proto(record) for record in records],
            next_page_token="" if next_cursor is None else validation.page_token(next_cursor),
        )

    def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.JobEvent]:
        validation.check_job_id(request.job_id)
        principal = principal_of(context)
        with self.streams.slot("WatchJob", principal, context, resumable=True) as stream:
            events = self.manager.watch(
                request.job_id, request.after_sequence, is_active=stream.is_active
            )
            yield from self.streams.send(stream, map(convert.event_to_proto, events))

    def GetJobLogs(
        self, request: pb.GetJobLogsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.LogChunk]:
        validation.check_job_id(request.job_id)
        principal = principal_of(context)
        # A followed log resumes from the offset each chunk names; a read to the end is short.
        with self.streams.slot(
            "GetJobLogs", principal, context, resumable=request.follow
        ) as stream:
            pieces = self.manager.logs(
                request.job_id, request.offset, follow=request.follow, is_active=stream.is_active
            )
            yield from self.streams.send(stream, map(convert.log_lines_to_proto, pieces))

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        validation.check_job_id(request.job_id)
        parts = self.manager.model_files(request.job_id, principal=principal_of(context))
        with self.streams.slot("DownloadModel", principal_of(context), context) as stream:
            for chunk in self.streams.send(stream, map(convert.model_part_to_proto, parts)):
                if not context.is_active():
                    return  # the client went away: read no more of the model
                yield chunk

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        validation.check_job_id(request.job_id)
        return convert.job_to_proto(
            self.manager.cancel(request.job_id, principal=principal_of(context))
        )

    def Evaluate(
        self, request: pb.EvaluateRequest, context: grpc.ServicerContext
    ) -> pb.EvaluateResponse:
        validation.check_job_id(request.job_id)
        if request.dataset:
            check_dataset_name(request.dataset)
        evaluation = self.manager.evaluate(
            request.job_id,
            request.dataset,
            request.use_checkpoint,
            principal=principal_of(context),
        )
        return convert.evaluation_to_proto(evaluation)

    def Predict(
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictResponse:
        validation.check_job_id(request.job_id)
        principal = principal_of(context)
        input_size = self.manager.model_input_size(request.job_id, principal=principal)
        as_tensor = request.HasField("tensor")
        if as_tensor:
            if request.inputs:
                raise InvalidArgument("inputs must be empty when tensor is set: send one of them")
            # (examples, input_size) uint8 or float32; the worker scales uint8 as for training.
            inputs = convert.tensor_from_proto(request.tensor, "tensor")
            validation.check_predict_tensor(inputs, input_size)
        else:
            validation.check_predict_count(len(request.inputs))  # before converting a value
            rows = convert.predict_rows(request)
            validation.check_predict_inputs(rows, input_size)
            inputs = np.asarray(rows, dtype=np.float32)  # (examples, input_size)
        predictions = self.manager.predict(request.job_id, inputs, principal=principal)
        return convert.predictions_to_proto(predictions.probabilities, as_tensor=as_tensor)

    def UploadDataset(
        self, requests: Iterator[pb.UploadDatasetRequest], context: grpc.ServicerContext
    ) -> pb.Dataset:
        first = next(requests, None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument(
                "header must come first: a DatasetUpload naming the file's name, size, "
                "SHA-256 and format",
                field="header",
            )
        header = convert.upload_header_from_proto(first.header)
        version = self.uploads.upload(
            header, _upload_chunks(requests), principal=principal_of(context)
        )
        return convert.dataset_to_proto(version)

    def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: grpc.ServicerContext
    ) -> pb.ListDatasetsResponse:
        versions = self.datasets.versions(request.name)
        return pb.ListDatasetsResponse(datasets=[convert.dataset_to_proto(v) for v in versions])

    def GetDataset(
        self, request: pb.GetDatasetRequest, context: grpc.ServicerContext
    ) -> pb.Dataset:
        return convert.dataset_to_proto(self.datasets.resolve(request.dataset))

    def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: grpc.ServicerContext
    ) -> pb.DeleteDatasetResponse:
        deleted = self.manager.delete_dataset(request.dataset, principal=principal_of(context))
        return pb.DeleteDatasetResponse(deleted=[convert.dataset_to_proto(v) for v in deleted])

    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.ServerInfo:
        return convert.server_info_to_proto(self.manager.status())

    # -- experiments ---------------------------------------------------------------

    @property
    def experiments(self) -> ExperimentManager:
        if self._experiments is None:
            raise Unavailable("this server runs no experiments")
        return self._experiments

    def SubmitExperiment(
        self, request: pb.SubmitExperimentRequest, context: grpc.ServicerContext
    ) -> pb.Experiment:
        validation.check_request_id(request.request_id)
        with convert.fields_under("spec"):
            spec = experiment_convert.experiment_spec_from_proto(request.spec)
            record = self.experiments.submit(
                spec, request.request_id, principal=principal_of(context)
            )
        return experiment_convert.experiment_to_proto(record)

    def GetExperiment(
        self, request: pb.GetExperimentRequest, context: grpc.ServicerContext
    ) -> pb.Experiment:
        check_experiment_id(request.experiment_id)
        record = self.experiments.get(request.experiment_id, principal=principal_of(context))
        return experiment_convert.experiment_to_proto(record)

    def ListExperiments(
        self, request: pb.ListExperimentsRequest, context: grpc.ServicerContext
    ) -> pb.ListExperimentsResponse:
        page_size, _ = validation.check_page(request.page_size, "")
        records = self.experiments.list(limit=page_size, principal=principal_of(context))
        return pb.ListExperimentsResponse(
            experiments=[experiment_convert.experiment_to_proto(record) for record in records]
        )

    def WatchExperiment(
        self, request: pb.WatchExperimentRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Experiment]:
        check_experiment_id(request.experiment_id)
        principal = principal_of(context)
        self.experiments.get(request.experiment_id, principal=principal)
        with self.streams.slot("WatchExperiment", principal, context, resumable=True) as stream:
            records = self.experiments.watch(request.experiment_id, is_active=stream.is_active)
            yield from self.streams.send(
                stream,
                (
                    experiment_convert.experiment_to_proto(
                        self.experiments.get(record.experiment_id, principal=principal)
                    )
                    for record in records
                ),
            )

    def CancelExperiment(
        self, request: pb.CancelExperimentRequest, context: grpc.ServicerContext
    ) -> pb.Experiment:
        check_experiment_id(request.experiment_id)
        record = self.experiments.cancel(request.experiment_id, principal=principal_of(context))
        return experiment_convert.experiment_to_proto(record)


def _upload_chunks(requests: Iterator[pb.UploadDatasetRequest]) -> Iterator[bytes]:
    """The file's bytes, from the messages after the header."""
    try:
        for request in requests:
            if request.HasField("header"):
                raise InvalidArgument(
                    "header must come once, first; a second one came", field="header"
                )
            yield request.chunk
    except grpc.RpcError:  # the client cancelled or went away: no traceback for that
        raise Unavailable("the upload was cut off before its last byte") from None
