"""Request and response bodies of the HTTP API (FastAPI and the Ray Serve deployment share them).

Fields are strict (a number where a text is expected is refused, not turned into a text) and
unknown fields are refused, so a typo in a client ("text" for "texts") is a 422 naming the
field rather than a silently ignored option. Size limits (texts per request, characters per
text) are server settings checked by the endpoint, because they answer 413, not 422.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

Pair = tuple[StrictStr, StrictStr]


class ClassifyRequest(BaseModel):
    """Texts (or sentence pairs) to classify with one task."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"task": "movie", "texts": ["a gripping film", "dull and slow"]}]},
    )
    task: StrictStr = Field(description="A task of the served model (GET /v1/tasks lists them).")
    texts: list[StrictStr | Pair] = Field(
        min_length=1, description="Inputs: a text, or a [first, second] pair for pair tasks (NLI). At most the server's --max-texts."
    )
    return_logits: StrictBool = Field(default=False, description="Also return each row's raw logits (for checks and calibration).")


class Prediction(BaseModel):
    label: str = Field(description="The most probable label.")
    label_id: int = Field(description="Its index in the task's labels.")
    score: float = Field(description="Its probability (softmax of the logits).")
    scores: dict[str, float] = Field(description="Every label's probability.")
    logits: list[float] | None = Field(default=None, description="Raw logits, when return_logits was set.")


class ClassifyResponse(BaseModel):
    task: str
    model_id: str = Field(description="Identity of the served model (the bundle id of a factored bundle).")
    predictions: list[Prediction] = Field(description="One per input, in order.")


class TaskInfo(BaseModel):
    name: str
    labels: list[str]


class TasksResponse(BaseModel):
    model_id: str
    tasks: list[TaskInfo]


class AdminResponse(BaseModel):
    task: str
    action: str = Field(description="added or removed")
    tasks: list[str] = Field(description="Every task served after the change.")


class Status(BaseModel):
    status: str
    detail: str | None = None


class ErrorResponse(BaseModel):
    """Every error answers this body: one line that says what is wrong and what to do."""

    error: str
