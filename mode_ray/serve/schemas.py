"""Request and response bodies: the Hugging Face Inference API's zero-shot image classification shape,
so `huggingface_hub.InferenceClient(model=URL).zero_shot_image_classification(...)` works unchanged,
plus our extras (model choice, routing method, expert weights, several templates, a batch route)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

HF_DEFAULT_TEMPLATE = "This is a photo of {}."


class ZeroShotParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    candidate_labels: list[str] = Field(description="Class names; at least 2.")
    hypothesis_template: str = Field(default=HF_DEFAULT_TEMPLATE, description="Prompt with '{}' for the label.")
    hypothesis_templates: list[str] | None = Field(
        default=None, description="Extra: several templates, averaged per label (as zero-shot evaluation does)."
    )
    model: str = Field(
        default="ensemble", description="ensemble | moe | expert-N | generalist | generalist-matched | seed"
    )
    routing: Literal["reference", "calibrated"] | None = Field(
        default=None, description="Ensemble routing method; default from the server's config."
    )
    return_expert_weights: bool = Field(default=False, description="Answer with the routing weights too.")


class ZeroShotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str = Field(description="The image, base64 (a data: URL prefix is accepted).")
    parameters: ZeroShotParameters


class BatchZeroShotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(description="Several base64 images, classified over one label set.")
    parameters: ZeroShotParameters


class LabelScore(BaseModel):
    label: str
    score: float


class ClassificationWithWeights(BaseModel):
    """The answer when `return_expert_weights` is set (a list of these for the batch route)."""

    predictions: list[LabelScore]
    model: str
    routing: str | None = None
    expert_weights: dict[str, float] | None = Field(
        default=None, description="Per-task weight of each expert (the mean over labels for per-class routing)."
    )


class ExpertInfo(BaseModel):
    id: str
    kind: Literal["expert", "baseline", "moe"]
    cluster_size: int | None = Field(description="Training pairs assigned to this expert's coarse cluster.")
    fine_clusters: int | None
    samples_seen: int | None
    checkpoint: str
    added: str | None = Field(default=None, description="When `mode-ray add-data` added this expert (UTC).")
    generation: str | None = Field(default=None, description="The data generation it was trained on.")
    refreshed: str | None = Field(
        default=None, description="When `add-data --refresh-experts` last retrained it on its grown partition (UTC)."
    )


class ExpertsResponse(BaseModel):
    experts: list[ExpertInfo]
    encoder_id: str
    n_fine: int
    routing: dict
    layout: str
    best_routing: str | None = None  # the routing whose ensemble scored best in the run's report (eval/summary.json)


class ErrorResponse(BaseModel):
    error: str


class RouteRequest(BaseModel):
    """The routing of a label set alone (the experts page's live view); the same label and template checks."""

    model_config = ConfigDict(extra="forbid")

    candidate_labels: list[str] = Field(description="Class names; at least 2.")
    hypothesis_template: str = Field(default=HF_DEFAULT_TEMPLATE, description="Prompt with '{}' for the label.")
    hypothesis_templates: list[str] | None = None
    routing: Literal["reference", "calibrated"] | None = None


class LabelRoute(BaseModel):
    label: str
    nearest_fine: int = Field(description="The fine centre nearest the label's embedding.")
    expert: str = Field(description="That centre's data expert.")
    distance: float = Field(description="L2 distance to it.")


class RouteResponse(BaseModel):
    routing: str
    expert_weights: dict[str, float] = Field(description="As POST / reports them for the same labels and templates.")
    labels: list[LabelRoute]


class TryImage(BaseModel):
    task: str
    image: str = Field(description="A JPEG data: URL, at most 224 pixels a side.")
    labels: list[str]
    answer: str
