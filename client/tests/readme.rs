//! The README's client examples are the files CI runs (`clients/check` runs each against a real
//! cluster), shown as they are: an example edited without the README, or the reverse, fails here.

use std::path::Path;

#[test]
fn the_readme_shows_each_client_example_as_it_is() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    for (example, fence) in [
        ("clients/python/examples/quickstart.py", "```python\n"),
        ("clients/typescript/examples/quickstart.ts", "```typescript\n"),
        ("client/examples/quickstart.rs", "```rust\n"),
    ] {
        let code = std::fs::read_to_string(root.join(example)).expect(example);
        let block = format!("{fence}{}\n```\n", code.trim_end());
        assert!(
            readme.contains(&block),
            "README.md does not show {example} as it is: copy the file into its {} block",
            fence.trim()
        );
    }
}
