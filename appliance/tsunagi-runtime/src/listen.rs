//! The bounded accept loop shared by the control socket and the metrics endpoint.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Bounds for one listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    /// Connections served at once; further ones are closed at once.
    pub(crate) max_clients: usize,
    /// The whole exchange with one client must finish within this.
    pub(crate) per_client: Duration,
}

/// Accepts connections until `cancel` fires and runs `handle` on each, within `bounds`.
pub(crate) async fn serve<S, A, AFut, H, HFut>(
    mut accept: A,
    bounds: Bounds,
    cancel: CancellationToken,
    handle: H,
) where
    A: FnMut() -> AFut,
    AFut: Future<Output = std::io::Result<S>>,
    H: Fn(S) -> HFut,
    HFut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(bounds.max_clients));
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = accept() => accepted,
        };
        let Ok(stream) = accepted else {
            // Out of descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // Too many clients at once: this one is dropped (closed).
        };
        let exchange = handle(stream);
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(bounds.per_client, exchange).await;
        });
    }
}
