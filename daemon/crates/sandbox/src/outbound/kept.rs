//! An outbound response kept for the task's journal: copied aside as it
//! streams to the guest ([`KeepingBody`]), and given again from the journal
//! to a run after another ([`replay`]) without sending anything.

use crate::port::{KeptResponse, MAX_KEPT_RESPONSE_BYTES, TaskPort};
use base64::Engine as _;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use wasmtime_wasi_http::{Error as HttpError, WasiBody};

/// A response and the future that ends with its connection, as
/// [`WasiHttpHooks::send_request`] gives them.
pub(super) type Exchanged = (
    http::Response<WasiBody>,
    Box<dyn Future<Output = Result<(), HttpError>> + Send>,
);

/// Told once what a [`KeepingBody`] kept.
type OnEnd = Box<dyn FnOnce(Option<Vec<u8>>) + Send>;

/// The response a run before kept, as the guest reads it again: nothing is
/// sent.
pub(super) fn replay(kept: KeptResponse) -> Result<Exchanged, HttpError> {
    let unusable = |why: String| HttpError::InternalError(Some(why));
    let body = base64::engine::general_purpose::STANDARD
        .decode(&kept.body)
        .map_err(|e| unusable(format!("the kept response cannot be decoded: {e}")))?;
    let mut response = http::Response::builder().status(kept.status);
    for (name, value) in &kept.headers {
        response = response.header(name, value);
    }
    let body = http_body_util::Full::new(Bytes::from(body))
        .map_err(|never: std::convert::Infallible| -> HttpError { match never {} })
        .boxed_unsync();
    let response = response
        .body(body)
        .map_err(|e| unusable(format!("the kept response cannot be rebuilt: {e}")))?;
    Ok((response, Box::new(async { Ok(()) })))
}

/// `response`, its body copied aside as the guest reads it: exchange `n`
/// of the task, kept through `journal` once read to its end.
pub(super) fn keeping(
    response: http::Response<WasiBody>,
    method: String,
    uri: String,
    journal: Arc<dyn TaskPort>,
    n: usize,
) -> http::Response<WasiBody> {
    let (parts, body) = response.into_parts();
    // Kept only when every header value is text (as nearly all are).
    let headers: Option<Vec<(String, String)>> = parts
        .headers
        .iter()
        .map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
        .collect();
    let status = parts.status.as_u16();
    let body = KeepingBody {
        inner: body,
        kept: Some(Vec::new()),
        done: Some(Box::new(move |bytes: Option<Vec<u8>>| {
            let response = bytes.zip(headers).map(|(bytes, headers)| KeptResponse {
                method,
                uri,
                status,
                headers,
                body: base64::engine::general_purpose::STANDARD.encode(bytes),
            });
            journal.outbound_response(n, response);
        })),
    };
    http::Response::from_parts(parts, body.boxed_unsync())
}

/// A response body that streams to the guest as it comes and is copied
/// aside for the task's journal: `done` gets the copy once the guest has
/// read it to its end, or `None` (an error, dropped before its end, past
/// [`MAX_KEPT_RESPONSE_BYTES`]).
struct KeepingBody {
    inner: WasiBody,
    /// The bytes so far; `None` once past the bound.
    kept: Option<Vec<u8>>,
    /// Told once, at the end or when dropped.
    done: Option<OnEnd>,
}

impl KeepingBody {
    fn finish(&mut self, complete: bool) {
        if let Some(done) = self.done.take() {
            let kept = self.kept.take();
            done(if complete { kept } else { None });
        }
    }
}

impl Body for KeepingBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let fits = this
                        .kept
                        .as_ref()
                        .is_some_and(|kept| kept.len() + data.len() <= MAX_KEPT_RESPONSE_BYTES);
                    match this.kept.as_mut() {
                        Some(kept) if fits => kept.extend_from_slice(data),
                        _ => this.kept = None,
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for KeepingBody {
    fn drop(&mut self) {
        self.finish(false);
    }
}
