from freshet.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PullRequest(_message.Message):
    __slots__ = ("table", "fids")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    FIDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    fids: _tensor_pb2.Tensor
    def __init__(self, table: _Optional[str] = ..., fids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("values", "version", "incarnation")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    values: _tensor_pb2.Tensor
    version: int
    incarnation: int
    def __init__(self, values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., version: _Optional[int] = ..., incarnation: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("table", "fids", "grads", "counts")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    FIDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    table: str
    fids: _tensor_pb2.Tensor
    grads: _tensor_pb2.Tensor
    counts: _tensor_pb2.Tensor
    def __init__(self, table: _Optional[str] = ..., fids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., grads: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., counts: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("version", "rows_updated", "incarnation")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    version: int
    rows_updated: int
    incarnation: int
    def __init__(self, version: _Optional[int] = ..., rows_updated: _Optional[int] = ..., incarnation: _Optional[int] = ...) -> None: ...

class PushPullRequest(_message.Message):
    __slots__ = ("pushes", "pulls")
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    pushes: _containers.RepeatedCompositeFieldContainer[PushRequest]
    pulls: _containers.RepeatedCompositeFieldContainer[PullRequest]
    def __init__(self, pushes: _Optional[_Iterable[_Union[PushRequest, _Mapping]]] = ..., pulls: _Optional[_Iterable[_Union[PullRequest, _Mapping]]] = ...) -> None: ...

class PushPullResponse(_message.Message):
    __slots__ = ("pushes", "pulls", "incarnation")
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    pushes: _containers.RepeatedCompositeFieldContainer[PushResponse]
    pulls: _containers.RepeatedCompositeFieldContainer[PullResponse]
    incarnation: int
    def __init__(self, pushes: _Optional[_Iterable[_Union[PushResponse, _Mapping]]] = ..., pulls: _Optional[_Iterable[_Union[PullResponse, _Mapping]]] = ..., incarnation: _Optional[int] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("table", "since_version", "limit")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SINCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    table: str
    since_version: int
    limit: int
    def __init__(self, table: _Optional[str] = ..., since_version: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ExportResponse(_message.Message):
    __slots__ = ("fids", "values", "versions", "next_version", "has_more")
    FIDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    fids: _tensor_pb2.Tensor
    values: _tensor_pb2.Tensor
    versions: _tensor_pb2.Tensor
    next_version: int
    has_more: bool
    def __init__(self, fids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., versions: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., next_version: _Optional[int] = ..., has_more: _Optional[bool] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("name", "dim", "rows", "version", "checkpoint_id", "checkpoint_version", "checkpoint_tag", "stats")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_TAG_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    rows: int
    version: int
    checkpoint_id: int
    checkpoint_version: int
    checkpoint_tag: str
    stats: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., rows: _Optional[int] = ..., version: _Optional[int] = ..., checkpoint_id: _Optional[int] = ..., checkpoint_version: _Optional[int] = ..., checkpoint_tag: _Optional[str] = ..., stats: _Optional[_Mapping[str, int]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("tag", "snapshot_dir", "expected_incarnation")
    TAG_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_DIR_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    tag: str
    snapshot_dir: str
    expected_incarnation: int
    def __init__(self, tag: _Optional[str] = ..., snapshot_dir: _Optional[str] = ..., expected_incarnation: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("expected_tag",)
    EXPECTED_TAG_FIELD_NUMBER: _ClassVar[int]
    expected_tag: str
    def __init__(self, expected_tag: _Optional[str] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("tables", "shard", "num_shards", "incarnation")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    shard: int
    num_shards: int
    incarnation: int
    def __init__(self, tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., shard: _Optional[int] = ..., num_shards: _Optional[int] = ..., incarnation: _Optional[int] = ...) -> None: ...
