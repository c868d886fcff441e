# Operator image: static-ish Rust binary on a distroless base.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --uid 65532 --no-create-home operator
USER 65532
COPY --from=build /src/target/release/taskqueue-operator /usr/local/bin/taskqueue-operator
ENTRYPOINT ["/usr/local/bin/taskqueue-operator"]
CMD ["run"]
