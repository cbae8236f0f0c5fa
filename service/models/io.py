"""What a served version takes and gives, as a request sees it: the input's name and crop, the outputs, the
classes and their labels, and the preprocessing its encoded images go through. Two versions that take the
same input can answer each other's decoded requests (a version replaced while a body was read)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from deepvit.artifact import ATTENTION_NAME
from deepvit.artifact.metadata import PreprocessSpec

from ..runtime import ModelRuntime


@dataclass(frozen=True)
class ModelIO:
    input_name: str
    output_name: str
    crop: int
    num_classes: int
    labels: tuple[str, ...]
    attention_cells: int = 0  # the attention output's width (grid²); 0: the artifact has no such output
    preprocess: PreprocessSpec | None = None  # what encoded images go through to become the input

    @classmethod
    def of(cls, runtime: ModelRuntime) -> ModelIO:
        meta, att = runtime.meta, runtime.meta.attention
        return cls(
            runtime.input_name,
            str(runtime.session.get_outputs()[0].name),
            meta.preprocess.crop_size,
            meta.num_classes,
            meta.labels,
            0 if att is None else att.grid * att.grid,
            meta.preprocess,
        )

    def takes_same_input(self, other: ModelIO) -> bool:
        """Whether a request decoded for ``other`` can be answered by this one (the attention output, which
        a request asks for by name, aside)."""
        return dataclasses.replace(self, attention_cells=0) == dataclasses.replace(other, attention_cells=0)

    @property
    def output_names(self) -> list[str]:
        return [self.output_name, ATTENTION_NAME] if self.attention_cells else [self.output_name]

    @property
    def input_shape(self) -> list[int]:
        return [-1, self.crop, self.crop, 3]
