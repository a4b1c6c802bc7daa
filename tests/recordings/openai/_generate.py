"""Regenerate the OpenAI recordings: ``python tests/recordings/openai/_generate.py``.

Bodies follow the OpenAPI spec (openai/openai-openapi@f85dbe22: FineTuningJob, OpenAIFile, Upload,
UploadPart, FineTuningJobEvent, FineTuningJobCheckpoint, ErrorResponse) and openai 3.57.0's models;
tests/test_openai_spec.py validates every body against the spec. Job ids are fixed (tests pin
``new_job_id``) so the metadata tag can be matched.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

HERE = Path(__file__).parent
T0 = 1795900000  # 2026-11-28 (unix seconds)
MODEL = "gpt-4o-mini-2024-07-18"
COMMON_NOTES = [
    "Bodies follow the OpenAPI spec openai/openai-openapi@f85dbe22 and openai 3.57.0; error response bodies use "
    "the spec's ErrorResponse envelope although the fine-tuning and files operations do not list error "
    "responses; the exact provider error wording is not in the spec and is illustrative.",
]


def file_obj(fid: str, name: str, size: int, status: str = "processed") -> dict:
    return {"id": fid, "object": "file", "bytes": size, "created_at": T0, "filename": name,
            "purpose": "fine-tune", "status": status}


def job(jid: str, status: str, tk: str, *, method: str = "supervised", train: str = "file-train01",
        valid: str | None = None, hp: dict | None = None, **over) -> dict:
    hp = hp or {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    body = {
        "object": "fine_tuning.job", "id": jid, "model": MODEL, "created_at": T0, "finished_at": None,
        "fine_tuned_model": None, "organization_id": "org-tunekit", "result_files": [], "status": status,
        "validation_file": valid, "training_file": train, "hyperparameters": dict(hp),
        "trained_tokens": None, "error": None, "seed": 42, "estimated_finish": None, "integrations": [],
        "metadata": {"tunekit_job_id": tk}, "method": {"type": method, method: {"hyperparameters": dict(hp)}},
    }
    if method == "dpo":
        body["hyperparameters"] = {k: v for k, v in hp.items() if k != "beta"}
    body.update(over)
    return body


def succeeded(body: dict, suffix: str = "tunekit") -> dict:
    out = copy.deepcopy(body)
    out.update(status="succeeded", finished_at=T0 + 900, trained_tokens=5768, result_files=["file-results01"],
               fine_tuned_model=f"ft:{MODEL}:org-tunekit:{suffix}:AbC123xy")
    return out


def event(eid: str, dt: int, message: str, *, level: str = "info", type_: str = "message", data=None) -> dict:
    return {"object": "fine_tuning.job.event", "id": eid, "created_at": T0 + dt, "level": level,
            "message": message, "type": type_, "data": data or {}}


def page(items: list) -> dict:
    return {"object": "list", "data": items, "has_more": False}


def error(status: int, message: str, type_: str, code=None, param=None, headers=None) -> dict:
    resp = {"status": status, "json": {"error": {"message": message, "type": type_, "param": param, "code": code}}}
    if headers:
        resp["headers"] = headers
    return resp


def ex(method: str, path: str, response: dict, *, json_=None, query=None, fields=None, repeat=None) -> dict:
    req: dict = {"method": method, "path": path}
    if json_ is not None:
        req["json"] = json_
    if query is not None:
        req["query"] = query
    if fields is not None:
        req["multipart_fields"] = fields
    out = {"request": req, "response": response}
    if repeat:
        out["repeat"] = repeat
    return out


def upload(fid: str, name: str, size: int = 9000) -> dict:
    return ex("POST", "/v1/files", {"status": 200, "json": file_obj(fid, name, size)}, fields=["file", "purpose"])


def ok(body: dict) -> dict:
    return {"status": 200, "json": body}


JOBS = "/v1/fine_tuning/jobs"


def lifecycle() -> dict:
    tk, jid = "tk-openai-life", "ftjob-Life0001"
    queued = job(jid, "validating_files", tk)
    running = job(jid, "running", tk, estimated_finish=T0 + 900)
    done = succeeded(running)
    done["estimated_finish"] = None
    events_1 = [event("ftevent-3", 60, "Fine-tuning job started"),
                event("ftevent-2", 30, "Files validated, moving job to queued state"),
                event("ftevent-1", 0, "Validating training file: file-train01")]
    events_2 = [event("ftevent-6", 900, "The job has successfully completed"),
                event("ftevent-5", 880, "New fine-tuned model created"),
                event("ftevent-4", 400, "Step 10/20: training loss=0.82", type_="metrics",
                      data={"step": 10, "train_loss": 0.82, "total_steps": 20, "train_mean_token_accuracy": 0.7}),
                *events_1]
    ckpts = {"object": "list", "has_more": False, "first_id": "ftckpt-20", "last_id": "ftckpt-10", "data": [
        {"object": "fine_tuning.job.checkpoint", "id": "ftckpt-20", "created_at": T0 + 880,
         "fine_tuned_model_checkpoint": f"ft:{MODEL}:org-tunekit:tunekit:AbC123xy:ckpt-step-20",
         "step_number": 20, "fine_tuning_job_id": jid,
         "metrics": {"step": 20, "train_loss": 0.41, "train_mean_token_accuracy": 0.86}},
        {"object": "fine_tuning.job.checkpoint", "id": "ftckpt-10", "created_at": T0 + 400,
         "fine_tuned_model_checkpoint": f"ft:{MODEL}:org-tunekit:tunekit:AbC123xy:ckpt-step-10",
         "step_number": 10, "fine_tuning_job_id": jid,
         "metrics": {"step": 10, "train_loss": 0.82, "train_mean_token_accuracy": 0.7}}]}
    return {"provider": "openai", "notes": COMMON_NOTES + [
        "Full lifecycle: upload -> create -> running (+events) -> succeeded (+checkpoints, events). "
        "Also used by examples/quickstart.py --backend openai --base-model gpt-4o-mini (1 epoch)."],
        "exchanges": [
            upload("file-train01", "tunekit-tk-openai-life-train.jsonl"),
            # No tag in the expected subset: examples/quickstart.py gets a random tunekit id (the test checks it).
            ex("POST", JOBS, ok(queued), json_={"model": MODEL, "training_file": "file-train01",
                                                 "method": {"type": "supervised"}}),
            ex("GET", f"{JOBS}/{jid}", ok(running)),
            ex("GET", f"{JOBS}/{jid}/events", ok(page(events_1)), query={"limit": "100"}),
            ex("GET", f"{JOBS}/{jid}", ok(done)),
            ex("GET", f"{JOBS}/{jid}/checkpoints", ok(ckpts), query={"limit": "100"}),
            ex("GET", f"{JOBS}/{jid}/events", ok(page(events_2)), query={"limit": "100"}),
        ]}


def dpo() -> dict:
    tk, jid = "tk-openai-dpo", "ftjob-Dpo0001"
    hp = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5, "beta": 0.25}
    created = job(jid, "validating_files", tk, method="dpo", valid="file-valid01", hp=hp, seed=7)
    return {"provider": "openai", "notes": COMMON_NOTES + [
        "DPO create with a validation file: preference rows uploaded as is; beta under method.dpo.hyperparameters. "
        "The top-level hyperparameters object is documented as returned only for supervised jobs; the value "
        "here (without beta) is an assumption."],
        "exchanges": [
            upload("file-train01", "tunekit-tk-openai-dpo-train.jsonl"),
            upload("file-valid01", "tunekit-tk-openai-dpo-validation.jsonl"),
            ex("POST", JOBS, ok(created), json_={
                "model": MODEL, "training_file": "file-train01", "validation_file": "file-valid01", "seed": 7,
                "suffix": "prefs", "method": {"type": "dpo", "dpo": {"hyperparameters": hp}},
                "metadata": {"tunekit_job_id": tk}}),
        ]}


def cancel() -> dict:
    tk, jid = "tk-openai-cancel", "ftjob-Cancel0001"
    return {"provider": "openai", "notes": COMMON_NOTES + ["Cancel: POST .../cancel answers the job, cancelled."],
            "exchanges": [
                upload("file-train01", "tunekit-tk-openai-cancel-train.jsonl"),
                ex("POST", JOBS, ok(job(jid, "queued", tk))),
                ex("POST", f"{JOBS}/{jid}/cancel", ok(job(jid, "cancelled", tk, finished_at=T0 + 30))),
            ]}


def failed() -> dict:
    tk, jid = "tk-openai-failed", "ftjob-Failed0001"
    err = {"code": "invalid_training_file", "param": "training_file",
           "message": "The job failed due to an invalid training file. Expected file to have JSONL format, "
                      "where every line is a valid JSON dictionary. Line 3 is not a dictionary."}
    return {"provider": "openai", "notes": COMMON_NOTES + [
        "Failed job: the provider's message is in FineTuningJob.error {code, message, param}; wording illustrative."],
        "exchanges": [
            upload("file-train01", "tunekit-tk-openai-failed-train.jsonl"),
            ex("POST", JOBS, ok(job(jid, "validating_files", tk))),
            ex("GET", f"{JOBS}/{jid}", ok(job(jid, "failed", tk, error=err, finished_at=T0 + 20))),
            ex("GET", f"{JOBS}/{jid}/events", ok(page([event("ftevent-f1", 20, err["message"], level="error")])),
               query={"limit": "100"}),
        ]}


def errors() -> dict:
    out = {}
    out["error_400_create"] = {"provider": "openai", "notes": COMMON_NOTES + ["400 on create (not retried)."],
                               "exchanges": [
        upload("file-train01", "tunekit-tk-openai-e400-train.jsonl"),
        ex("POST", JOBS, error(400, f"Model {MODEL} is not available for fine-tuning or does not exist.",
                               "invalid_request_error", code="model_not_available", param="model")),
    ]}
    out["error_401_upload"] = {"provider": "openai", "notes": COMMON_NOTES + [
        "401 on the first call (the upload); OpenAI's message echoes a masked key."], "exchanges": [
        ex("POST", "/v1/files", error(401, "Incorrect API key provided: sk-canar**********0000. You can find your "
                                           "API key at https://platform.openai.com/account/api-keys.",
                                      "invalid_request_error", code="invalid_api_key")),
    ]}
    out["error_404_retrieve"] = {"provider": "openai", "notes": COMMON_NOTES + ["404 on retrieve (not retried)."],
                                 "exchanges": [
        ex("GET", f"{JOBS}/ftjob-missing", error(404, "Could not find fine tune: ftjob-missing",
                                                 "invalid_request_error", param="id")),
    ]}
    tk, jid = "tk-openai-retry", "ftjob-Retry0001"
    out["rate_limit_429"] = {"provider": "openai", "notes": COMMON_NOTES + [
        "429 with Retry-After: 1 on retrieve, then success; tunekit must wait >= 1 s. The spec documents "
        "Retry-After (integer seconds) in components.responses.TooManyRequests."], "exchanges": [
        ex("GET", f"{JOBS}/{jid}", error(429, "Rate limit reached for requests", "requests",
                                         code="rate_limit_exceeded", headers={"retry-after": "1"})),
        ex("GET", f"{JOBS}/{jid}", ok(job(jid, "running", tk))),
    ]}
    out["server_error_500"] = {"provider": "openai", "notes": COMMON_NOTES + [
        "500 on create: ambiguous, so tunekit looks for the tagged job (none), waits, creates again, lists the "
        "tagged jobs once more (a duplicate would be cancelled; there is none); then 500 on retrieve, retried."], "exchanges": [
        upload("file-train01", "tunekit-tk-openai-retry-train.jsonl"),
        ex("POST", JOBS, error(500, "The server had an error while processing your request. Sorry about that!",
                               "server_error")),
        ex("GET", JOBS, ok(page([])), query={"metadata[tunekit_job_id]": tk, "limit": "10"}),
        ex("POST", JOBS, ok(job(jid, "queued", tk)), json_={"metadata": {"tunekit_job_id": tk}}),
        ex("GET", JOBS, ok(page([job(jid, "queued", tk)])), query={"metadata[tunekit_job_id]": tk, "limit": "10"}),
        ex("GET", f"{JOBS}/{jid}", error(500, "The server had an error while processing your request. Sorry about "
                                              "that!", "server_error")),
        ex("GET", f"{JOBS}/{jid}", ok(job(jid, "running", tk))),
    ]}
    tk, jid = "tk-openai-drop", "ftjob-Drop0001"
    out["dropped_create"] = {"provider": "openai", "notes": COMMON_NOTES + [
        "The connection drops after the create request was sent; the job WAS created. tunekit lists jobs by "
        "metadata[tunekit_job_id] and adopts it instead of creating a second one."], "exchanges": [
        upload("file-train01", "tunekit-tk-openai-drop-train.jsonl"),
        ex("POST", JOBS, {"drop": True}, json_={"metadata": {"tunekit_job_id": tk}}),
        ex("GET", JOBS, ok(page([job(jid, "queued", tk)])), query={"metadata[tunekit_job_id]": tk, "limit": "10"}),
        ex("GET", f"{JOBS}/{jid}", ok(job(jid, "running", tk))),
    ]}
    return out


def large_upload() -> dict:
    tk, jid = "tk-openai-big", "ftjob-Big0001"
    up = {"id": "upload_big01", "object": "upload", "bytes": 0, "created_at": T0, "filename":
          "tunekit-tk-openai-big-train.jsonl", "purpose": "fine-tune", "status": "pending", "expires_at": T0 + 3600,
          "file": None}
    done = dict(up, status="completed", file=file_obj("file-big01", up["filename"], 0))
    parts = [ex("POST", "/v1/uploads/upload_big01/parts", ok({"id": f"part_{i}", "object": "upload.part",
                                                              "created_at": T0, "upload_id": "upload_big01"}),
                fields=["data"]) for i in range(3)]
    return {"provider": "openai", "notes": COMMON_NOTES + [
        "Uploads API (files over files_api_max_bytes; the test lowers it): create, 3 parts, complete with md5. "
        "'bytes' in the bodies is a placeholder (the test data size differs); the test checks the sizes sent."],
        "exchanges": [
            ex("POST", "/v1/uploads", ok(up), json_={"purpose": "fine-tune", "mime_type": "text/jsonl",
                                                     "filename": up["filename"]}),
            *parts,
            ex("POST", "/v1/uploads/upload_big01/complete", ok(done),
               json_={"part_ids": ["part_0", "part_1", "part_2"]}),
            ex("POST", JOBS, ok(job(jid, "queued", tk, train="file-big01")),
               json_={"training_file": "file-big01", "metadata": {"tunekit_job_id": tk}}),
        ]}


EXAMPLES = HERE.parents[2] / "examples" / "data"
IMPORT_NOTE = (
    "Import (tunekit import openai): the spec documents GET /files/{file_id}/content as a string (under "
    "application/json); the API sends the file's bytes, recorded here as a raw body (the tests check that body "
    "against the string schema). Job lists, events and checkpoints are cursor pages: has_more + after=<last id>.")


def _rows(start: int, stop: int) -> str:
    lines = (EXAMPLES / "chat.jsonl").read_text().splitlines()[start:stop]
    return "".join(line + "\n" for line in lines)


def content(fid: str, body: str) -> dict:
    return ex("GET", f"/v1/files/{fid}/content",
              {"status": 200, "headers": {"content-type": "application/octet-stream"}, "body": body})


def gone(fid: str) -> dict:
    return ex("GET", f"/v1/files/{fid}/content",
              error(404, f"No such File object: {fid}", "invalid_request_error", param="id"))


def ckpt(jid: str, model: str, step: int, loss: float, valid: float) -> dict:
    return {"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{jid[-4:]}-{step}", "created_at": T0 + 40 * step,
            "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{step}", "step_number": step,
            "fine_tuning_job_id": jid, "metrics": {"step": step, "train_loss": loss, "valid_loss": valid}}


RESULT_CSV = ("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"
              "1,1.9,0.41,2.0,0.4\n2,1.2,0.55,,\n3,0.7,0.8,0.9,0.75\n")


def imports() -> dict:
    a, b, c = "ftjob-ImpA0001", "ftjob-ImpB0002", "ftjob-ImpC0003"
    hp_a = {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8}
    job_a = succeeded(job(a, "running", "", train="file-impA-train", valid="file-impA-valid", hp=hp_a, seed=11,
                          metadata=None), suffix="sqlbot")
    job_a["result_files"] = ["file-impA-results"]
    model_a = job_a["fine_tuned_model"]
    hp_b = {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 0.5, "beta": 0.2}
    job_b = job(b, "cancelled", "", method="dpo", train="file-impB-train", hp=hp_b, metadata=None,
                finished_at=T0 + 60)
    job_c = succeeded(job(c, "running", "", train="file-impC-train", metadata=None), suffix="")
    job_c["fine_tuned_model"] = f"ft:{MODEL}:org-tunekit::ZzZ99999"
    job_c["result_files"] = ["file-impC-results"]
    prefs = "".join(line + "\n" for line in (EXAMPLES / "preference.jsonl").read_text().splitlines()[:10])
    events_a1 = [event(f"ftevent-a{i}", 100 * i, f"Step {i}/3: training loss={loss}", type_="metrics",
                       data={"step": i, "train_loss": loss, "total_steps": 3})
                 for i, loss in ((3, 0.7), (2, 1.2))]
    events_a2 = [event("ftevent-a1", 100, "Step 1/3: training loss=1.9", type_="metrics",
                       data={"step": 1, "train_loss": 1.9, "total_steps": 3}),
                 event("ftevent-a0", 0, "Validating training file: file-impA-train")]
    listing = "/v1/fine_tuning/jobs"
    return {"provider": "openai", "notes": COMMON_NOTES + [IMPORT_NOTE,
        "--all over two pages of jobs: A (supervised, succeeded, validation file, result CSV, two pages of "
        "events), B (DPO, cancelled), C (succeeded, its training file deleted: 404 on content)."],
        "exchanges": [
            ex("GET", listing, ok({"object": "list", "data": [job_a, job_b], "has_more": True}),
               query={"limit": "100"}),
            ex("GET", listing, ok({"object": "list", "data": [job_c], "has_more": False}),
               query={"limit": "100", "after": b}),
            content("file-impA-train", _rows(0, 12)),
            content("file-impA-valid", _rows(12, 16)),
            ex("GET", f"{JOBS}/{a}/checkpoints", ok({
                "object": "list", "has_more": False, "first_id": f"ftckpt-{a[-4:]}-3", "last_id": f"ftckpt-{a[-4:]}-2",
                "data": [ckpt(a, model_a, 3, 0.7, 0.9), ckpt(a, model_a, 2, 1.2, 1.3)]}), query={"limit": "100"}),
            ex("GET", f"{JOBS}/{a}/events", ok({"object": "list", "data": events_a1, "has_more": True}),
               query={"limit": "100"}),
            ex("GET", f"{JOBS}/{a}/events", ok(page(events_a2)), query={"limit": "100", "after": "ftevent-a2"}),
            content("file-impA-results", RESULT_CSV),
            content("file-impB-train", prefs),
            ex("GET", f"{JOBS}/{b}/events", ok(page([event("ftevent-b1", 60, "Fine-tuning job cancelled")])),
               query={"limit": "100"}),
            gone("file-impC-train"),
            ex("GET", f"{JOBS}/{c}/checkpoints", ok({"object": "list", "data": [], "has_more": False}),
               query={"limit": "100"}),
            ex("GET", f"{JOBS}/{c}/events", ok(page([event("ftevent-c1", 900, "The job has successfully completed")])),
               query={"limit": "100"}),
            gone("file-impC-results"),
        ]}


def reimport() -> dict:
    a = "ftjob-Again0001"
    running = job(a, "running", "", train="file-again-train", metadata=None, estimated_finish=T0 + 900)
    done = succeeded(running, suffix="again")
    resolved = {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8}  # 'auto' resolved by OpenAI
    done.update(estimated_finish=None, result_files=[], hyperparameters=resolved,
                method={"type": "supervised", "supervised": {"hyperparameters": resolved}})
    ev1 = [event("ftevent-g1", 10, "Fine-tuning job started")]
    ev2 = [event("ftevent-g2", 900, "The job has successfully completed"), *ev1]
    ckpts = {"object": "list", "data": [], "has_more": False}
    return {"provider": "openai", "notes": COMMON_NOTES + [IMPORT_NOTE,
        "The same job imported twice: first while running (hyperparameters 'auto'), then after it succeeded "
        "(the values OpenAI chose). The second import fetches no file (the data is already kept) and adds only "
        "the new event."],
        "exchanges": [
            ex("GET", f"{JOBS}/{a}", ok(running)),
            content("file-again-train", _rows(0, 10)),
            ex("GET", f"{JOBS}/{a}/events", ok(page(ev1)), query={"limit": "100"}),
            ex("GET", f"{JOBS}/{a}", ok(done)),
            ex("GET", f"{JOBS}/{a}/checkpoints", ok(ckpts), query={"limit": "100"}),
            ex("GET", f"{JOBS}/{a}/events", ok(page(ev2)), query={"limit": "100"}),
        ]}


def completion(cid: str, model: str, answer: str, finish: str = "stop") -> dict:
    return {"id": cid, "object": "chat.completion", "created": T0, "model": model,
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                         "message": {"role": "assistant", "content": answer, "refusal": None}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}


def distill_chat() -> dict:
    model = f"ft:{MODEL}:org-tunekit:sqlbot:AbC123xy"
    rows = [json.loads(line) for line in (EXAMPLES / "train.jsonl").read_text().splitlines()[:3]]
    chat = "/v1/chat/completions"

    def ask(row: dict) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": row["prompt"]}]}

    return {"provider": "openai", "notes": COMMON_NOTES + [
        "tunekit distill, one request at a time, over the first 3 rows of examples/data/train.jsonl: a 500 on the "
        "first prompt is retried under the one retry policy; the third answer is cut at max_tokens "
        "(finish_reason=length) and is rejected, not written."],
        "exchanges": [
            ex("POST", chat, error(500, "The server had an error while processing your request. Sorry about that!",
                                   "server_error"), json_=ask(rows[0])),
            ex("POST", chat, ok(completion("chatcmpl-d1", model, "box star dog (distilled)")), json_=ask(rows[0])),
            ex("POST", chat, ok(completion("chatcmpl-d2", model, "Madrid (distilled)")), json_=ask(rows[1])),
            ex("POST", chat, ok(completion("chatcmpl-d3", model, "dog tree", finish="length")), json_=ask(rows[2])),
        ]}


def main() -> None:
    recordings = {"lifecycle": lifecycle(), "dpo_create": dpo(), "cancel": cancel(), "failed": failed(),
                  "large_upload": large_upload(), "import_all": imports(), "import_again": reimport(),
                  "distill_chat": distill_chat(),
                  **errors()}
    for name, data in recordings.items():
        (HERE / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    print("wrote", ", ".join(sorted(recordings)))


if __name__ == "__main__":
    main()
