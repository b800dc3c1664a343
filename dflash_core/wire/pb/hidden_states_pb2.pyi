from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceInfo(_message.Message):
    __slots__ = ("verifier_name_or_path", "architecture", "num_layers", "hidden_size", "vocab_size", "tokenizer_sha256", "dtype", "max_length", "backend", "layer_ids", "max_frame_bytes", "max_batch_tokens", "server_version", "payload_port", "engine_replicas", "max_generate_prompts", "max_generate_tokens")
    VERIFIER_NAME_OR_PATH_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_PORT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATE_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    verifier_name_or_path: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    tokenizer_sha256: str
    dtype: str
    max_length: int
    backend: str
    layer_ids: _containers.RepeatedScalarFieldContainer[int]
    max_frame_bytes: int
    max_batch_tokens: int
    server_version: str
    payload_port: int
    engine_replicas: int
    max_generate_prompts: int
    max_generate_tokens: int
    def __init__(self, verifier_name_or_path: _Optional[str] = ..., architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., tokenizer_sha256: _Optional[str] = ..., dtype: _Optional[str] = ..., max_length: _Optional[int] = ..., backend: _Optional[str] = ..., layer_ids: _Optional[_Iterable[int]] = ..., max_frame_bytes: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., server_version: _Optional[str] = ..., payload_port: _Optional[int] = ..., engine_replicas: _Optional[int] = ..., max_generate_prompts: _Optional[int] = ..., max_generate_tokens: _Optional[int] = ...) -> None: ...

class ExtractRequest(_message.Message):
    __slots__ = ("sample_id", "token_ids", "layer_ids")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    sample_id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    layer_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, sample_id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., layer_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("dtype", "shape", "layer_ids", "token_ids_sha256", "num_bytes")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    layer_ids: _containers.RepeatedScalarFieldContainer[int]
    token_ids_sha256: bytes
    num_bytes: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., layer_ids: _Optional[_Iterable[int]] = ..., token_ids_sha256: _Optional[bytes] = ..., num_bytes: _Optional[int] = ...) -> None: ...

class SampleError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ExtractResponse(_message.Message):
    __slots__ = ("sample_id", "header", "frame_index", "num_frames", "data", "error")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    sample_id: int
    header: TensorHeader
    frame_index: int
    num_frames: int
    data: bytes
    error: SampleError
    def __init__(self, sample_id: _Optional[int] = ..., header: _Optional[_Union[TensorHeader, _Mapping]] = ..., frame_index: _Optional[int] = ..., num_frames: _Optional[int] = ..., data: _Optional[bytes] = ..., error: _Optional[_Union[SampleError, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompts", "params")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    params: SamplingParams
    def __init__(self, prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("token_ids", "finish_reason")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("completions",)
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    def __init__(self, completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ...) -> None: ...
