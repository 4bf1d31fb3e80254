package shim

import (
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// Since containerd 2.3 the `start` action receives a bootstrap message
// (containerd.runtime.bootstrap.v1.BootstrapParams) on stdin instead of the
// runtime options, with the options inside it as an extension. This shim is
// built on containerd 2.2's libraries, whose runc manager reads options
// from stdin; so that ShimCgroup and the rest reach it under both
// protocols, Start finds the options inside a bootstrap message and hands
// runc's manager the old form. Field numbers are those of
// api/runtime/bootstrap/v1/bootstrap.proto:
//
//	BootstrapParams { string instance_id = 1; string namespace = 2; repeated Extension extensions = 8; ... }
//	Extension       { google.protobuf.Any value = 1; }
const (
	bootstrapInstanceID = 1
	bootstrapNamespace  = 2
	bootstrapExtensions = 8
	extensionValue      = 1
)

// bootstrapExtensions returns the extensions of a bootstrap message for
// shim id in namespace ns, and whether data is one. Runtime options of the
// old protocol can decode as a bootstrap message too, so, as containerd's
// own shim library does, data counts as one only if it names this shim.
func parseBootstrap(data []byte, id, ns string) ([]*anypb.Any, bool) {
	var (
		instance, namespace string
		exts                []*anypb.Any
	)
	for len(data) > 0 {
		num, typ, n := protowire.ConsumeTag(data)
		if n < 0 {
			return nil, false
		}
		data = data[n:]
		switch {
		case num == bootstrapInstanceID && typ == protowire.BytesType:
			instance, n = protowire.ConsumeString(data)
		case num == bootstrapNamespace && typ == protowire.BytesType:
			namespace, n = protowire.ConsumeString(data)
		case num == bootstrapExtensions && typ == protowire.BytesType:
			var ext []byte
			if ext, n = protowire.ConsumeBytes(data); n >= 0 {
				if a, ok := extensionAny(ext); ok {
					exts = append(exts, a)
				}
			}
		default:
			n = protowire.ConsumeFieldValue(num, typ, data)
		}
		if n < 0 {
			return nil, false
		}
		data = data[n:]
	}
	return exts, instance != "" && instance == id && namespace == ns
}

func extensionAny(ext []byte) (*anypb.Any, bool) {
	for len(ext) > 0 {
		num, typ, n := protowire.ConsumeTag(ext)
		if n < 0 {
			return nil, false
		}
		ext = ext[n:]
		if num == extensionValue && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(ext)
			if n < 0 {
				return nil, false
			}
			var a anypb.Any
			if err := proto.Unmarshal(v, &a); err != nil {
				return nil, false
			}
			return &a, true
		}
		n = protowire.ConsumeFieldValue(num, typ, ext)
		if n < 0 {
			return nil, false
		}
		ext = ext[n:]
	}
	return nil, false
}
