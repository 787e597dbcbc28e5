"""The TrainingService RPCs: convert the request, call the job manager, convert back.

No training logic and no error handling here: domain errors raised below are
mapped to status codes by `service.errors.ExceptionToStatusInterceptor`.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc

from service import spec as convert
from service.jobs import JobManager


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, manager: JobManager):
        self.manager = manager

    def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.ServicerContext) -> pb.Job:
        convert.check_request_id(request.request_id)
        job_spec = convert.job_spec_from_proto(request.spec)
        return convert.job_to_proto(self.manager.submit(job_spec, request.request_id))

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        convert.check_job_id(request.job_id)
        return convert.job_to_proto(self.manager.get(request.job_id))

    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        page_size, cursor, states = convert.page_request(request)
        records, next_cursor = self.manager.list(states=states, page_size=page_size, cursor=cursor)
        return pb.ListJobsResponse(
            jobs=[convert.job_to_proto(record) for record in records],
            next_page_token="" if next_cursor is None else str(next_cursor),
        )

    def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.JobEvent]:
        convert.check_job_id(request.job_id)
        events = self.manager.watch(
            request.job_id, request.after_sequence, is_active=context.is_active
        )
        for event in events:
            yield convert.event_to_proto(event)

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        convert.check_job_id(request.job_id)
        return convert.job_to_proto(self.manager.cancel(request.job_id))

    def Evaluate(
        self, request: pb.EvaluateRequest, context: grpc.ServicerContext
    ) -> pb.EvaluateResponse:
        convert.check_job_id(request.job_id)
        if request.dataset:
            convert.check_dataset_name(request.dataset)
        answer = self.manager.evaluate(request.job_id, request.dataset, request.use_checkpoint)
        return pb.EvaluateResponse(**answer)

    def Predict(
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictResponse:
        convert.check_job_id(request.job_id)
        input_size = self.manager.model_input_size(request.job_id)
        inputs = convert.predict_inputs(request, input_size)
        probabilities = self.manager.predict(request.job_id, inputs)  # (examples, classes)
        return pb.PredictResponse(
            predictions=[
                pb.Prediction(label=int(row.argmax()), probabilities=row.tolist())
                for row in probabilities
            ]
        )

    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.ServerInfo:
        status = self.manager.status()
        devices = [
            pb.Device(
                name=gpu.name,
                kind="GPU",
                memory_bytes=gpu.memory_bytes,
                description=gpu.description,
                busy=gpu.index in status.busy_gpus,
            )
            for gpu in status.inventory.gpus
        ]
        devices.append(
            pb.Device(
                name="CPU:0",
                kind="CPU",
                description=status.inventory.cpu_description,
                busy=status.cpu_jobs > 0,
            )
        )
        return pb.ServerInfo(
            version=status.version,
            tensorflow_version=status.tensorflow_version,
            python_version=status.python_version,
            devices=devices,
            strategies=list(status.strategies),
            queue_length=status.queue_length,
            running_jobs=status.running_jobs,
            warm_workers=status.warm_workers,
        )
