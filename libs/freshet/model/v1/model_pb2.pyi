from freshet.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_APPROVE: _ClassVar[Decision]
    DECISION_REJECT: _ClassVar[Decision]
    DECISION_ROLLBACK: _ClassVar[Decision]
DECISION_UNSPECIFIED: Decision
DECISION_APPROVE: Decision
DECISION_REJECT: Decision
DECISION_ROLLBACK: Decision

class DenseSnapshot(_message.Message):
    __slots__ = ("model", "step", "params", "samples_trained", "created_ms", "stream_seq", "model_config")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TRAINED_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    STREAM_SEQ_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_FIELD_NUMBER: _ClassVar[int]
    model: str
    step: int
    params: _containers.MessageMap[str, _tensor_pb2.Tensor]
    samples_trained: int
    created_ms: int
    stream_seq: int
    model_config: str
    def __init__(self, model: _Optional[str] = ..., step: _Optional[int] = ..., params: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., samples_trained: _Optional[int] = ..., created_ms: _Optional[int] = ..., stream_seq: _Optional[int] = ..., model_config: _Optional[str] = ...) -> None: ...

class ModelDelta(_message.Message):
    __slots__ = ("model", "table", "shard", "sequence", "base_version", "new_version", "fids", "values", "dense", "dense_step", "checksum", "created_ms", "scales")
    class DenseEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    FIDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    DENSE_STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    model: str
    table: str
    shard: int
    sequence: int
    base_version: int
    new_version: int
    fids: _tensor_pb2.Tensor
    values: _tensor_pb2.Tensor
    dense: _containers.MessageMap[str, _tensor_pb2.Tensor]
    dense_step: int
    checksum: int
    created_ms: int
    scales: _tensor_pb2.Tensor
    def __init__(self, model: _Optional[str] = ..., table: _Optional[str] = ..., shard: _Optional[int] = ..., sequence: _Optional[int] = ..., base_version: _Optional[int] = ..., new_version: _Optional[int] = ..., fids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., dense: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., dense_step: _Optional[int] = ..., checksum: _Optional[int] = ..., created_ms: _Optional[int] = ..., scales: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("model", "shard", "sequence", "new_version", "delta_stream_seq", "decision", "reason", "decided_ms", "table", "snapshot", "rollback_version", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    DELTA_STREAM_SEQ_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DECIDED_MS_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    model: str
    shard: int
    sequence: int
    new_version: int
    delta_stream_seq: int
    decision: Decision
    reason: str
    decided_ms: int
    table: str
    snapshot: str
    rollback_version: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, model: _Optional[str] = ..., shard: _Optional[int] = ..., sequence: _Optional[int] = ..., new_version: _Optional[int] = ..., delta_stream_seq: _Optional[int] = ..., decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[str] = ..., decided_ms: _Optional[int] = ..., table: _Optional[str] = ..., snapshot: _Optional[str] = ..., rollback_version: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ShardPosition(_message.Message):
    __slots__ = ("shard", "sequence", "table_versions")
    class TableVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    shard: int
    sequence: int
    table_versions: _containers.ScalarMap[str, int]
    def __init__(self, shard: _Optional[int] = ..., sequence: _Optional[int] = ..., table_versions: _Optional[_Mapping[str, int]] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("object", "table", "shard", "rows", "checksum")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    object: str
    table: str
    shard: int
    rows: int
    checksum: int
    def __init__(self, object: _Optional[str] = ..., table: _Optional[str] = ..., shard: _Optional[int] = ..., rows: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class SnapshotManifest(_message.Message):
    __slots__ = ("model", "id", "created_ms", "shards", "delta_stream_seq", "dense_sequence", "dense_step", "model_config", "chunks", "rows", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    DELTA_STREAM_SEQ_FIELD_NUMBER: _ClassVar[int]
    DENSE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DENSE_STEP_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    id: str
    created_ms: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardPosition]
    delta_stream_seq: int
    dense_sequence: int
    dense_step: int
    model_config: str
    chunks: _containers.RepeatedCompositeFieldContainer[SnapshotChunk]
    rows: int
    reason: str
    def __init__(self, model: _Optional[str] = ..., id: _Optional[str] = ..., created_ms: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardPosition, _Mapping]]] = ..., delta_stream_seq: _Optional[int] = ..., dense_sequence: _Optional[int] = ..., dense_step: _Optional[int] = ..., model_config: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[SnapshotChunk, _Mapping]]] = ..., rows: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("model", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
