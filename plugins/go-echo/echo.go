// A gatewayd agent in Go: streams the input back upper-cased, then as is.
//
// It targets the world `agent` of wit/gateway.wit through the bindings that
// `wit-bindgen go` generates (build.sh makes them in a scratch directory and
// puts this file into their package export_byclaw_gateway_handler, the one
// the generated `//go:wasmexport` functions call). Each WIT function is a Go
// function: the exports Describe, Handle and InvokeTool are defined here; the
// imports are in packages of their own (byclaw_gateway_emit.EmitChunk, ...).
// A WIT `string` is a Go string, a `list` a slice, a `result` the generic
// witTypes.Result, a `variant` such as `error` a struct built with its
// Make... functions. Memory is Go's: the bindings pin what the host still
// has to read and copy what it hands in.
package export_byclaw_gateway_handler

import (
	"encoding/json"

	witTypes "go.bytecodealliance.org/pkg/wit/types"
	"wit_component/byclaw_gateway_emit"
	"wit_component/byclaw_gateway_types"
)

type result = witTypes.Result[string, byclaw_gateway_types.Error]

func Describe() byclaw_gateway_types.Manifest {
	return byclaw_gateway_types.Manifest{
		Id:           "go-echo",
		Version:      "0.1.0",
		Description:  "Echoes the input upper-cased and as is, from Go",
		Capabilities: []string{"go-echo"},
		Workspace:    false,
	}
}

func Handle(command byclaw_gateway_types.Command) result {
	// `content` is JSON: the text of a plain message is a JSON string; any
	// other value (a list of messages, say) is echoed as its JSON text.
	var text string
	if json.Unmarshal([]byte(command.Content), &text) != nil {
		text = command.Content
	}
	byclaw_gateway_emit.EmitState("ECHOING")
	byclaw_gateway_emit.EmitChunk(asciiUpper(text))
	byclaw_gateway_emit.EmitChunk(text)
	reply, err := json.Marshal(map[string]string{"echo": text, "language": "go"})
	if err != nil {
		return witTypes.Err[string](byclaw_gateway_types.MakeErrorFailed(err.Error()))
	}
	return witTypes.Ok[string, byclaw_gateway_types.Error](string(reply))
}

func InvokeTool(name string, args string) result {
	// No tools: error.not-found naming the tool.
	return witTypes.Err[string](byclaw_gateway_types.MakeErrorNotFound(name))
}

// asciiUpper upper-cases ASCII letters and leaves every other byte as is.
func asciiUpper(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'a' && c <= 'z' {
			b[i] = c - ('a' - 'A')
		}
	}
	return string(b)
}
