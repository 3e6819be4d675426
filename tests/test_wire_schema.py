"""Our .proto describes exactly the wire format of the official SDK's protobuf messages."""

from google.protobuf import descriptor_pb2
from tinker.proto import tinker_public_pb2 as sdk

from lathe.api.wire import tinker_wire_pb2 as ours


def wire_shape(file_descriptor):
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)

    def fields(msg, prefix=""):
        out = {}
        for f in msg.field:
            out[prefix + msg.name + "." + f.name] = (
                f.number,
                f.type,
                f.label,
                f.type_name.rsplit(".", 1)[-1],
                f.proto3_optional,
            )
        for nested in msg.nested_type:
            out.update(fields(nested, prefix + msg.name + "."))
        return out

    shape = {}
    for msg in proto.message_type:
        shape.update(fields(msg))
    for enum in proto.enum_type:
        shape[enum.name] = tuple((v.name, v.number) for v in enum.value)
    return shape


def test_proto_matches_sdk_field_for_field():
    assert wire_shape(ours.DESCRIPTOR) == wire_shape(sdk.DESCRIPTOR)


def test_bytes_round_trip_between_sdk_and_ours():
    msg = sdk.SampleResponse(prompt_logprobs=b"\x00\x00\xc0\x7f")
    msg.sequences.add(stop_reason=sdk.STOP_REASON_LENGTH, tokens=b"\x01\x00\x00\x00")
    parsed = ours.SampleResponse.FromString(msg.SerializeToString())
    assert parsed.sequences[0].stop_reason == ours.STOP_REASON_LENGTH
    assert parsed.HasField("prompt_logprobs") and not parsed.HasField("topk_prompt_logprobs")
