/*
 * A gatewayd agent in C: streams the input back upper-cased, then as is.
 *
 * It targets the world `agent` of wit/gateway.wit through the bindings that
 * `wit-bindgen c` generates (agent.h, agent.c and agent_component_type.o;
 * build.sh makes them in a scratch directory, they are not kept here). The
 * bindings turn each WIT function into a C function:
 *
 *   export  handler.describe     exports_byclaw_gateway_handler_describe     (we define it)
 *   export  handler.handle       exports_byclaw_gateway_handler_handle       (we define it)
 *   export  handler.invoke-tool  exports_byclaw_gateway_handler_invoke_tool  (we define it)
 *   import  emit.emit-chunk      byclaw_gateway_emit_emit_chunk              (the host's)
 *
 * A WIT `string` is an agent_string_t {ptr, len}: UTF-8, not NUL-terminated.
 * A `result<T, error>` export returns true and fills *ret, or returns false
 * and fills *err.
 *
 * Memory, as the generated bindings handle it:
 *  - The arguments of an exported function belong to us: we free them (with
 *    the generated *_free helpers) before returning.
 *  - What an exported function returns must be heap memory (malloc, or the
 *    agent_string_dup helpers): after the host has copied it, the bindings
 *    free() it. So never return a string literal through agent_string_set.
 *  - The arguments of an imported (host) function are only borrowed: they
 *    stay ours, and a string literal is fine there.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"

/* ---- A growable byte buffer ------------------------------------------- */

typedef struct {
    uint8_t *ptr;
    size_t len;
    size_t cap;
} buf_t;

static void buf_push(buf_t *b, const void *bytes, size_t n) {
    if (n == 0) return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n) cap *= 2;
        uint8_t *grown = realloc(b->ptr, cap);
        if (!grown) abort(); /* out of memory: trap, the task fails */
        b->ptr = grown;
        b->cap = cap;
    }
    memcpy(b->ptr + b->len, bytes, n);
    b->len += n;
}

static void buf_byte(buf_t *b, uint8_t byte) { buf_push(b, &byte, 1); }

static void buf_str(buf_t *b, const char *s) { buf_push(b, s, strlen(s)); }

/* Hands the buffer over as a component string (same malloc'd bytes, no copy). */
static agent_string_t buf_into_string(buf_t *b) {
    agent_string_t s = {b->ptr, b->len};
    *b = (buf_t){0};
    return s;
}

/* A component string borrowed from a C string literal: for host calls only. */
static agent_string_t borrowed(const char *literal) {
    agent_string_t s;
    agent_string_set(&s, literal);
    return s;
}

/* ---- JSON strings ------------------------------------------------------ */

/* Appends the code point `cp` encoded as UTF-8. */
static void utf8_encode(buf_t *out, uint32_t cp) {
    if (cp < 0x80) {
        buf_byte(out, (uint8_t)cp);
    } else if (cp < 0x800) {
        buf_byte(out, (uint8_t)(0xC0 | (cp >> 6)));
        buf_byte(out, (uint8_t)(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        buf_byte(out, (uint8_t)(0xE0 | (cp >> 12)));
        buf_byte(out, (uint8_t)(0x80 | ((cp >> 6) & 0x3F)));
        buf_byte(out, (uint8_t)(0x80 | (cp & 0x3F)));
    } else {
        buf_byte(out, (uint8_t)(0xF0 | (cp >> 18)));
        buf_byte(out, (uint8_t)(0x80 | ((cp >> 12) & 0x3F)));
        buf_byte(out, (uint8_t)(0x80 | ((cp >> 6) & 0x3F)));
        buf_byte(out, (uint8_t)(0x80 | (cp & 0x3F)));
    }
}

/* Reads the four hex digits of a \uXXXX escape; -1 if they are not hex. */
static int32_t hex4(const uint8_t *p) {
    int32_t value = 0;
    for (int i = 0; i < 4; i++) {
        uint8_t c = p[i];
        int digit = c >= '0' && c <= '9'   ? c - '0'
                    : c >= 'a' && c <= 'f' ? c - 'a' + 10
                    : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                           : -1;
        if (digit < 0) return -1;
        value = value * 16 + digit;
    }
    return value;
}

/*
 * If the JSON text `json` is a single JSON string, appends its decoded
 * UTF-8 value to `out` and returns true; returns false (leaving `out` in an
 * unspecified state) for any other JSON value.
 */
static bool json_string_decode(const uint8_t *json, size_t n, buf_t *out) {
    size_t i = 0;
    while (i < n && (json[i] == ' ' || json[i] == '\t' || json[i] == '\n' || json[i] == '\r')) i++;
    if (i >= n || json[i] != '"') return false;
    i++;
    while (i < n) {
        uint8_t c = json[i++];
        if (c == '"') return true; /* the closing quote */
        if (c != '\\') {
            buf_byte(out, c); /* plain byte, UTF-8 passes through */
            continue;
        }
        if (i >= n) return false;
        switch (json[i++]) {
        case '"': buf_byte(out, '"'); break;
        case '\\': buf_byte(out, '\\'); break;
        case '/': buf_byte(out, '/'); break;
        case 'b': buf_byte(out, '\b'); break;
        case 'f': buf_byte(out, '\f'); break;
        case 'n': buf_byte(out, '\n'); break;
        case 'r': buf_byte(out, '\r'); break;
        case 't': buf_byte(out, '\t'); break;
        case 'u': {
            if (i + 4 > n) return false;
            int32_t cp = hex4(json + i);
            if (cp < 0) return false;
            i += 4;
            /* A high surrogate followed by \uDC00..\uDFFF is one code point. */
            if (cp >= 0xD800 && cp <= 0xDBFF && i + 6 <= n && json[i] == '\\' && json[i + 1] == 'u') {
                int32_t low = hex4(json + i + 2);
                if (low >= 0xDC00 && low <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                    i += 6;
                }
            }
            if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD; /* a lone surrogate */
            utf8_encode(out, (uint32_t)cp);
            break;
        }
        default: return false;
        }
    }
    return false; /* no closing quote */
}

/* Appends `s` (UTF-8) as a JSON string literal, quotes included. */
static void json_string_encode(buf_t *out, const uint8_t *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    buf_byte(out, '"');
    for (size_t i = 0; i < n; i++) {
        uint8_t c = s[i];
        switch (c) {
        case '"': buf_str(out, "\\\""); break;
        case '\\': buf_str(out, "\\\\"); break;
        case '\b': buf_str(out, "\\b"); break;
        case '\f': buf_str(out, "\\f"); break;
        case '\n': buf_str(out, "\\n"); break;
        case '\r': buf_str(out, "\\r"); break;
        case '\t': buf_str(out, "\\t"); break;
        default:
            if (c < 0x20) { /* other control characters: \u00XX */
                char escape[] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 0xF]};
                buf_push(out, escape, sizeof escape);
            } else {
                buf_byte(out, c); /* everything else, UTF-8 included, as is */
            }
        }
    }
    buf_byte(out, '"');
}

/* ---- The agent --------------------------------------------------------- */

void exports_byclaw_gateway_handler_describe(exports_byclaw_gateway_handler_manifest_t *ret) {
    /* Everything returned is heap memory: the bindings free it afterwards. */
    agent_string_dup(&ret->id, "c-echo");
    agent_string_dup(&ret->version, "0.1.0");
    agent_string_dup(&ret->description, "Echoes the input upper-cased and as is, from C");
    ret->capabilities.len = 1;
    ret->capabilities.ptr = malloc(sizeof(agent_string_t));
    if (!ret->capabilities.ptr) abort();
    agent_string_dup(&ret->capabilities.ptr[0], "c-echo");
    ret->tools = (byclaw_gateway_types_list_tool_t){NULL, 0};
    ret->prompts = (byclaw_gateway_types_list_prompt_t){NULL, 0};
    ret->workspace = false;
}

bool exports_byclaw_gateway_handler_handle(exports_byclaw_gateway_handler_command_t *command,
                                           exports_byclaw_gateway_handler_json_t *ret,
                                           exports_byclaw_gateway_handler_error_t *err) {
    (void)err; /* this agent never fails */

    /* `content` is JSON: the text of a plain message is a JSON string; any
     * other value (a list of messages, say) is echoed as its JSON text. */
    buf_t text = {0};
    if (!json_string_decode(command->content.ptr, command->content.len, &text)) {
        text.len = 0;
        buf_push(&text, command->content.ptr, command->content.len);
    }

    /* Host calls borrow their arguments. */
    agent_string_t state = borrowed("ECHOING");
    byclaw_gateway_emit_emit_state(&state);

    /* First chunk: ASCII letters upper-cased, every other byte as is. */
    buf_t upper = {0};
    buf_push(&upper, text.ptr, text.len);
    for (size_t i = 0; i < upper.len; i++) {
        if (upper.ptr[i] >= 'a' && upper.ptr[i] <= 'z') upper.ptr[i] -= 'a' - 'A';
    }
    agent_string_t chunk = {upper.ptr, upper.len};
    byclaw_gateway_emit_emit_chunk(&chunk);
    free(upper.ptr);

    /* Second chunk: the text as it came. */
    chunk = (agent_string_t){text.ptr, text.len};
    byclaw_gateway_emit_emit_chunk(&chunk);

    /* The result: {"echo": <text>, "language": "c"}. Its malloc'd bytes
     * become the returned string; the bindings free them. */
    buf_t json = {0};
    buf_str(&json, "{\"echo\":");
    json_string_encode(&json, text.ptr, text.len);
    buf_str(&json, ",\"language\":\"c\"}");
    *ret = buf_into_string(&json);

    free(text.ptr);
    /* The command is ours: free every string in it. */
    exports_byclaw_gateway_handler_command_free(command);
    return true;
}

bool exports_byclaw_gateway_handler_invoke_tool(agent_string_t *name,
                                                exports_byclaw_gateway_handler_json_t *args,
                                                exports_byclaw_gateway_handler_json_t *ret,
                                                exports_byclaw_gateway_handler_error_t *err) {
    (void)ret;
    /* No tools: error.not-found naming the tool. The name is ours, so it
     * moves into the error as is, and the bindings free it with the error. */
    err->tag = BYCLAW_GATEWAY_TYPES_ERROR_NOT_FOUND;
    err->val.not_found = *name;
    byclaw_gateway_types_json_free(args);
    return false;
}
