"""The safetensors format read and written with numpy alone, so importing diffusers' weights
needs neither torch nor the `safetensors` package.

The format: an 8-byte little-endian header length, a JSON header {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}} whose offsets count from the end of
the header, then the tensors' raw little-endian bytes, row-major.
"""

import json
import struct

import numpy as np

from flaxvae.errors import ConfigError

DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def _bfloat16_to_float32(raw):
  """bfloat16 is the high half of a float32: widen the bits, exactly."""
  return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def read(path):
  """{name: numpy array} of a .safetensors file (bfloat16 widened to float32, exactly)."""
  try:
    with open(path, "rb") as f:
      blob = f.read()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
  except (OSError, struct.error, ValueError) as e:
    raise ConfigError(f"{path} is not a readable safetensors file: {e}") from None
  data = memoryview(blob)[8 + length :]
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    begin, end = entry["data_offsets"]
    kind, shape = entry["dtype"], tuple(entry["shape"])
    raw = np.frombuffer(data[begin:end], np.uint8)
    if kind == "BF16":
      out[name] = _bfloat16_to_float32(raw).reshape(shape)
    elif kind in DTYPES:
      out[name] = raw.view(np.dtype(DTYPES[kind]).newbyteorder("<")).reshape(shape).copy()
    else:
      raise ConfigError(f"{path}: tensor {name} has dtype {kind}, which flaxvae cannot read")
  return out


def write(path, tensors, metadata=None):
  """Writes {name: numpy array} as a .safetensors file (names sorted, as the package does)."""
  header, chunks, offset = {}, [], 0
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in NAMES:
      raise ConfigError(f"cannot write tensor {name} of dtype {array.dtype} as safetensors")
    raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {
      "dtype": NAMES[array.dtype],
      "shape": list(array.shape),
      "data_offsets": [offset, offset + len(raw)],
    }
    chunks.append(raw)
    offset += len(raw)
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the package aligns the data to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for chunk in chunks:
      f.write(chunk)
