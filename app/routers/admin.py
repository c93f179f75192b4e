"""The admin API: compression jobs and hot swaps of the served model, behind `LITEASR_ADMIN_TOKEN`.

Every route checks the token before anything else: the compression request body is read and validated by hand,
after the check, so a caller without the token learns nothing, not even whether its JSON was valid.
"""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.deps import JobsDep, ServiceDep, require_admin
from app.errors import UploadTooLarge
from app.jobs import JobRecord
from app.schemas import ADMIN_ERRORS, ActivationOut, CompressJobRequest, JobList, JobOut

router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=ADMIN_ERRORS
)

MAX_BODY_BYTES = 64 * 1024


@router.post(
    "/compress",
    status_code=202,
    summary="Queue a compression job",
    response_model=JobOut,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": CompressJobRequest.model_json_schema()}},
        }
    },
)
async def compress(request: Request, jobs: JobsDep) -> JSONResponse:
    """Compress `source` into `LITEASR_MODELS_DIR/<name>` in a separate process; poll `/admin/jobs/{id}`."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise UploadTooLarge(f"the request body is larger than {MAX_BODY_BYTES // 1024} KiB")
    try:
        job_request = CompressJobRequest.model_validate_json(body or b"null")
    except ValidationError as error:
        raise RequestValidationError(
            [
                {**e, "loc": ("body", *e["loc"])}
                for e in error.errors(include_url=False, include_context=False)
            ]
        ) from None
    job = await jobs.submit(job_request)
    return JSONResponse(
        _job_out(job).model_dump(mode="json"), status_code=202, headers={"Location": f"/admin/jobs/{job.id}"}
    )


@router.get("/jobs", summary="Every job, newest first", response_model=JobList)
async def list_jobs(jobs: JobsDep) -> JobList:
    return JobList(data=[_job_out(job) for job in jobs.store.list()])


@router.get("/jobs/{job_id}", summary="One job", response_model=JobOut)
async def get_job(job_id: str, jobs: JobsDep) -> JobOut:
    return _job_out(jobs.store.get(job_id))


@router.delete("/jobs/{job_id}", summary="Cancel a queued or running job", response_model=JobOut)
async def cancel_job(job_id: str, jobs: JobsDep) -> JobOut:
    return _job_out(await jobs.cancel(job_id))


@router.post(
    "/models/{name}/activate", summary="Serve another model (hot swap)", response_model=ActivationOut
)
async def activate(name: str, service: ServiceDep) -> ActivationOut:
    """Requests admitted before the swap finish on the old model; later ones use this one."""
    previous, seconds = await service.activate(name)
    return ActivationOut(model=name, previous=previous, load_seconds=round(seconds, 3))


def _job_out(job: JobRecord) -> JobOut:
    return JobOut.model_validate(asdict(job))  # Unix times become UTC datetimes
