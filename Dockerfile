# Operator image: the release binary on Debian bookworm-slim, as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

FROM debian:bookworm-slim
# Debian's base already has a group named `operator` (gid 37): a plain `useradd operator` fails.
RUN groupadd --gid 65532 nonroot && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin nonroot
USER 65532:65532
COPY --from=build /src/target/release/taskqueue-operator /usr/local/bin/taskqueue-operator
ENTRYPOINT ["/usr/local/bin/taskqueue-operator"]
CMD ["run"]
