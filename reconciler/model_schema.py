"""The JSON Schema `mailrec schema` prints, for editors and CI: what a state file may say."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import CoreSchema

from reconciler.model import DesiredState
from reconciler.model_types import format_duration


class StateJsonSchema(GenerateJsonSchema):
    """The JSON Schema of what a state file may say (pydantic's validation mode: a connection
    is a string, a duration 48h), with defaults written the way a state file writes them
    (2d, not the ISO 8601 P2D pydantic would show), and the draft it follows declared."""

    def encode_default(self, dft: Any) -> Any:
        if isinstance(dft, timedelta):
            return format_duration(dft)
        return super().encode_default(dft)

    def generate(self, schema: CoreSchema, mode: JsonSchemaMode = "validation") -> JsonSchemaValue:
        return {"$schema": self.schema_dialect, **super().generate(schema, mode=mode)}


def state_json_schema() -> dict[str, Any]:
    """What `mailrec schema` prints: every shipped state file validates against it."""
    return DesiredState.model_json_schema(mode="validation", schema_generator=StateJsonSchema)
