//! One bounded call of a provider: a program run with the request on stdin, or a gRPC call.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

use super::{grpc, Invocation, Provider, MAX_ANSWER};

/// Which of the protocol's two operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Operation {
    Wrap,
    Unwrap,
}

/// How much of a failing program's stderr an error repeats: enough for its message.
const MAX_STDERR: usize = 1024;

/// Runs `request` through `provider` within its deadline; the error says what happened in
/// words for an operator (never the request's or the answer's bytes).
pub(super) fn call(
    provider: &Provider,
    operation: Operation,
    request: &[u8],
) -> Result<Zeroizing<Vec<u8>>, String> {
    let run = || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a client runtime: {e}"))?;
        let deadline = provider.limits.timeout;
        runtime.block_on(async {
            match tokio::time::timeout(deadline, call_async(provider, operation, request)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!(
                    "no answer within {deadline:?} (the daemon's [keyproviders] timeout_secs)"
                )),
            }
        })
    };
    // A runtime cannot be started on a thread that is already driving one (a caller inside an
    // async context): run it on a thread of its own then.
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|scope| scope.spawn(run).join().expect("provider call panicked"))
    } else {
        run()
    }
}

async fn call_async(
    provider: &Provider,
    operation: Operation,
    request: &[u8],
) -> Result<Zeroizing<Vec<u8>>, String> {
    match &provider.invocation {
        Invocation::Command { path, args } => run_command(path, args, request).await,
        Invocation::Grpc(address) => {
            // Only failures to reach the provider are retried: an answer, even a refusal, is
            // the provider's word.
            let mut backoff = Duration::from_millis(250);
            let mut attempt = 0;
            loop {
                match grpc::call(address, operation, request, provider.limits.timeout).await {
                    Ok(answer) => return Ok(answer),
                    Err(grpc::Failure::Unreachable(reason))
                        if attempt < provider.limits.retries =>
                    {
                        tracing::info!(provider = provider.name, %reason, attempt, "keyprovider unreachable; retrying");
                        attempt += 1;
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                    Err(grpc::Failure::Unreachable(reason)) => {
                        return Err(format!(
                            "cannot reach gRPC keyprovider at {address} ({} attempts): {reason}",
                            attempt + 1
                        ))
                    }
                    Err(grpc::Failure::Refused(reason)) => {
                        return Err(format!("gRPC keyprovider at {address} said: {reason}"))
                    }
                }
            }
        }
    }
}

async fn run_command(
    path: &std::path::Path,
    args: &[String],
    request: &[u8],
) -> Result<Zeroizing<Vec<u8>>, String> {
    let started = Instant::now();
    let mut child = tokio::process::Command::new(path)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A program still running when the deadline passes is killed with the call.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    let mut stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let write = async {
        // A program that exits without reading its input is judged by its exit status.
        let _ = stdin.write_all(request).await;
        drop(stdin);
    };
    let mut answer = Zeroizing::new(Vec::new());
    let read_answer = async {
        stdout
            .take(MAX_ANSWER as u64 + 1)
            .read_to_end(&mut answer)
            .await
    };
    let mut message = Vec::new();
    let read_stderr = async {
        stderr
            .take(MAX_STDERR as u64)
            .read_to_end(&mut message)
            .await
    };
    let (_, read, _, status) = tokio::join!(write, read_answer, read_stderr, child.wait());
    let status = status.map_err(|e| format!("waiting for {}: {e}", path.display()))?;
    read.map_err(|e| format!("reading the answer of {}: {e}", path.display()))?;
    if !status.success() {
        let said = String::from_utf8_lossy(&message);
        let said = said.trim();
        return Err(format!(
            "{} {status} after {:?}{}",
            path.display(),
            started.elapsed(),
            if said.is_empty() {
                String::new()
            } else {
                format!(": {said}")
            }
        ));
    }
    if answer.len() > MAX_ANSWER {
        return Err(format!(
            "{} answered more than {MAX_ANSWER} bytes",
            path.display()
        ));
    }
    Ok(answer)
}
